"""LoRA (peft) without Ray: the recipe's lora block is checked against the model's layer names at
load time; DPO's reference with the adapters disabled is the frozen base; the rl update through
adapters, with merged weights loaded into a separate engine model each step, raises the reward.

The learning tests train the LM head too (`train_lm_head`): a fresh tiny model's random head
(init std 0.02, hidden 128) caps every logit the frozen head can produce near +-3, so adapters
alone cannot make an answer likely (measured: the digit task's reward stays near 0.15). LoRA is
for trained models; here the head stands in for the training those have had.
"""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from posttrain.config import ConfigError, RecipeConfig
from posttrain.lora import LoRAConfig, adapter_disabled, apply_lora, merged_state, merged_tensors
from posttrain.schema import apply_overrides, parse_dataclass

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = yaml.safe_load("""
name: lora
model: {preset: tiny-hybrid}
stages:
  - {name: sft, kind: sft, steps: 2, data: {task: arithmetic}, lora: {rank: 4}}
  - {name: dpo, kind: dpo, steps: 2, data: {task: arithmetic, format: rl}, pairs: {source: policy}, lora: {rank: 4}}
""")


def load(*overrides: str, raw: dict = RECIPE) -> RecipeConfig:
    return parse_dataclass(RecipeConfig, apply_overrides(copy.deepcopy(raw), list(overrides)), "")


# ------------------------------------------------------------------------------ config
def test_lora_targets_are_checked_against_the_model_at_load_time():
    assert load().stages[0].lora == LoRAConfig(rank=4)
    with pytest.raises(ConfigError) as e:
        load("stages.dpo.lora.targets=[qkv_proj, qproj]")
    msg = str(e.value)
    assert msg.startswith("stages[1].lora.targets: 'qproj' matches no module"), msg
    for name in ("q_proj", "qkv_proj", "output_gate", "out_proj", "w1"):  # the names that exist
        assert name in msg
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.lora\.target_regex: '.*mlp.*' matches no module"):
        load(r"stages.sft.lora.target_regex=.*\.mlp\..*")
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.lora\.targets: the LM head"):
        load("stages.sft.lora.targets=[lm_head]")
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.lora\.rank: must be >= 1"):
        load("stages.sft.lora.rank=0")
    # a layer count from model.overrides is what the check sees
    assert load("model.overrides={num_hidden_layers: 2}", "stages.sft.lora.target_regex=model\\.layers\\.1\\..*_proj")


def test_continue_adapter_needs_the_same_lora_block_in_the_stage_it_starts_from():
    assert load("stages.dpo.lora.continue_adapter=true").stages[1].lora.continue_adapter
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.lora\.continue_adapter: the stage this one starts from \(sft\)"):
        load("stages.dpo.lora.continue_adapter=true", "stages.dpo.lora.rank=8")
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.lora\.continue_adapter: .*\(none\)"):
        load("stages.sft.lora.continue_adapter=true")


def test_any_hugging_face_model_gets_its_attention_projections(tmp_path):
    from posttrain.testing import toy_transformer

    toy_transformer(0).save_pretrained(tmp_path / "qwen")
    raw = copy.deepcopy(RECIPE)
    raw["model"] = {"path": str(tmp_path / "qwen")}
    cfg = load(raw=raw)
    from posttrain.lora import module_types
    from posttrain.models import meta_model

    assert cfg.stages[0].lora.target_modules(module_types(meta_model(cfg.model))) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.lora\.experts: the model has no linear expert layers"):
        load("stages.sft.lora.experts=true", raw=raw)


def test_experts_get_adapters_in_our_hybrid(tok):
    """peft rewrites w1/w2/w3 of model_type "minimax" into transformers' fused experts; ours are
    linear layers and must get adapters as named."""
    from posttrain.testing import toy_hybrid

    model = toy_hybrid(0, tok)
    apply_lora(model, LoRAConfig(rank=2, experts=True))
    adapted = {n.rsplit(".", 3)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in adapted
    assert "model.layers.7.self_attn.o_proj" in adapted and "model.layers.0.self_attn.qkv_proj" in adapted
    assert model.config.model_type == "minimax"  # the config is left as it was


# ------------------------------------------------------------------------------- DPO
class InProcess:
    """A Learners stand-in on one in-process model (what compute_reference calls)."""

    world_size = 1

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def call_rank0(self, fn, *args):
        return fn(self.model, *args)


def test_dpo_reference_with_adapters_disabled_equals_a_frozen_base_copy(tok, tmp_path):
    from posttrain.data import PreferenceRecord
    from posttrain.objectives import reference_logprobs
    from posttrain.stages.dpo_pairs import compute_reference, encode_pairs, preference_batch
    from posttrain.testing import preference_pairs, toy_hybrid

    pairs = encode_pairs([PreferenceRecord(p, c, r) for p, c, r in preference_pairs()], tok, 64, tmp_path)
    policy, base = toy_hybrid(0, tok), toy_hybrid(0, tok).eval()
    apply_lora(policy, LoRAConfig(rank=4, train_lm_head=True))
    with torch.no_grad():  # a trained adapter (B = 0 at the start would make the test vacuous)
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ref = compute_reference(InProcess(policy), pairs, tok.pad_token_id, micro_size=3, chunk_size=1024)
    batches = [preference_batch(pairs[i:i + 3], tok.pad_token_id) for i in range(0, len(pairs), 3)]
    flat = reference_logprobs(base, batches, 1024)
    pos, expect = 0, []
    for i in range(0, len(pairs), 3):
        n = len(pairs[i:i + 3])
        expect += list(zip(flat[pos:pos + n], flat[pos + n:pos + 2 * n]))
        pos += 2 * n
    assert ref == expect  # values, bitwise: the base layers compute exactly what the base copy does
    trained = reference_logprobs(policy, batches, 1024)
    assert max(abs(a - b) for a, b in zip(trained, flat)) > 1e-2  # the adapters are back on afterwards
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n or "modules_to_save" in n)


# -------------------------------------------------------------------------------- RL
def test_rl_through_adapters_with_merged_weights_in_the_engine_raises_the_reward(tok):
    """test_rl_learns' loop, with the policy training adapters and the engine a separate plain
    model that receives the merged changing tensors (what a weight sync sends) before each step."""
    from posttrain.objectives import GRPOLoss, PolicyObjective, StepCounts
    from posttrain.rollout import SamplingConfig, SamplingParams
    from posttrain.rollout.native import NativeEngine
    from posttrain.testing import digit_task, rl_batch_from_samples, toy_hybrid

    task, G = digit_task(), 8
    policy, engine_model = toy_hybrid(0, tok), toy_hybrid(0, tok).eval()
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    apply_lora(policy, LoRAConfig(rank=16, alpha=32, train_lm_head=True))
    changing = [n for n, t in merged_state(policy).items() if t.changing]
    assert len(changing) == 7 * 3 + 4 + 1  # lightning qkv/gate/out, softmax q/k/v/o, the head
    engine, prompts = NativeEngine(engine_model, num_slots=64), task.encode(tok)
    objective = PolicyObjective(GRPOLoss(clip_low=0.2, clip_high=0.28), SamplingConfig(n=G, temperature=1.0,
                                                                                         max_new_tokens=3))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    means = []
    for step in range(12):
        engine.load_weights(merged_tensors(policy, changing))
        outs = engine.generate(prompts, SamplingParams.of(objective.sampling, stop_token_ids=(tok.eos_token_id,),
                                                          seed=step))
        rewards = [task.reward(tok.decode(c.token_ids, skip_special_tokens=True)) for c in outs]
        means.append(sum(rewards) / len(rewards))
        batch = rl_batch_from_samples(prompts, outs, rewards, G, pad_token_id=tok.pad_token_id)
        if step == 0:  # the engine's log-probs are the learner's (merged weights == base + adapters)
            with torch.no_grad():
                lp = objective.logprobs(policy.eval(), [batch])[0]
            policy.train()
            assert torch.allclose(lp * batch.mask, batch.rollout_logprobs * batch.mask, atol=1e-4)
        counts = StepCounts(tokens=float(batch.mask.sum()), sequences=float(len(outs)))
        opt.zero_grad()
        objective(policy, batch, counts)[0].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
    assert means[0] < 0.3
    assert sum(means[-3:]) / 3 > max(0.5, 2 * sum(means[:3]) / 3), means
    after = policy.state_dict()
    for name, w in base.items():  # every base tensor bitwise as it was
        key = name if name in after else name.replace(".weight", ".base_layer.weight")
        key = key if key in after else name.replace("lm_head.", "lm_head.original_module.")
        assert torch.equal(after[key], w), name


def test_adapter_disabled_restores_the_adapters_when_the_block_raises(tok):
    from posttrain.testing import toy_hybrid

    model = toy_hybrid(0, tok)
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(RuntimeError):
        with adapter_disabled(model):
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("inside")
    assert sum(p.requires_grad for p in model.parameters()) == 2 * (7 * 3 + 4)
