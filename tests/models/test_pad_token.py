"""A special token inside a sequence must not blow gradients up.

RL samples from the whole vocabulary, so a completion can contain the pad token. With an
all-zero pad embedding (nn.Embedding's padding_idx) the first RMSNorm sees a zero vector,
whose Jacobian is 1/sqrt(eps); stacked over layers the gradient became NaN at once.
"""
import torch

from posttrain.config import ModelConfig
from posttrain.data import build_tokenizer
from posttrain.models import build_model, forward_hidden, token_logprobs
from posttrain.data import token_ids


def test_pad_token_inside_a_sequence_keeps_gradients_finite():
    torch.set_num_threads(1)
    tok = build_tokenizer("char")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-hybrid"), **token_ids(tok)).train()
    pad = tok.pad_token_id
    ids = torch.tensor([[tok.bos_token_id, 20, 21, pad, 22, 23, 24, 25]])
    targets = torch.tensor([[-100, 21, pad, 22, 23, 24, 25, -100]])
    assert model.get_input_embeddings().weight[pad].abs().sum() > 0
    hidden, _ = forward_hidden(model, ids, attention_mask=torch.ones_like(ids))
    (-token_logprobs(model, hidden, targets).sum()).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert torch.isfinite(norm) and norm < 1e3


# ------------------------------------------------ a checkpoint written by plain transformers
def _transformers_checkpoint(tmp_path, tok):
    """MiniMaxForCausalLM(MiniMaxConfig(..., pad_token_id=0)), random init, save_pretrained: its
    embedding has padding_idx, so the pad row is exactly zero on disk."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    torch.manual_seed(0)
    cfg = MiniMaxConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                        num_experts_per_tok=2, layer_types=["linear_attention"] * 7 + ["full_attention"],
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, max_position_embeddings=256)
    hf = MiniMaxForCausalLM(cfg)
    assert hf.model.embed_tokens.weight[tok.pad_token_id].abs().sum() == 0
    hf.save_pretrained(tmp_path)
    return str(tmp_path)


def _rl_batch(tok):
    """Two prompts x 2 samples as the rl stage batches them: a pad token sampled inside two
    completions (attended), and right padding after the shorter ones (masked)."""
    from posttrain.rollout import Completion
    from posttrain.testing.batches import rl_batch_from_samples

    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts = [[tok.bos_token_id, 20, 21, 22], [tok.bos_token_id, 30, 31]]
    outs = [[23, pad, 24, eos], [25, 26, eos], [pad, 27, 28, 29, 40, eos], [41, eos]]
    completions = [Completion(i // 2, i % 2, ids, [-1.5] * len(ids), "stop") for i, ids in enumerate(outs)]
    batch = rl_batch_from_samples(prompts, completions, [1.0, 0.0, 0.0, 1.0], 2, pad_token_id=pad)
    inside = (batch.model_batch.input_ids == pad) & (batch.model_batch.attention_mask == 1)
    after = batch.model_batch.attention_mask == 0
    assert inside.sum() == 2 and after.sum() > 0  # the batch has both kinds of padding
    return batch


def _grad_norm(model, batch) -> torch.Tensor:
    from posttrain.objectives import GRPOLoss, PolicyObjective, StepCounts
    from posttrain.rollout import SamplingConfig

    objective = PolicyObjective(GRPOLoss(), SamplingConfig(n=2))
    counts = StepCounts(tokens=float(batch.mask.sum()), sequences=float(batch.mask.shape[0]))
    model.zero_grad()
    loss, _ = objective(model, batch, counts)
    assert torch.isfinite(loss)
    loss.backward()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))


def test_transformers_checkpoint_zero_pad_row_keeps_rl_gradients_finite(tmp_path, one_thread):
    from posttrain.models import HybridForCausalLM
    from posttrain.testing import char_tokenizer

    tok = char_tokenizer()
    path = _transformers_checkpoint(tmp_path, tok)
    batch = _rl_batch(tok)

    # the cause, shown: the same weights with the zero row kept overflow in backward
    raw = HybridForCausalLM(HybridForCausalLM.config_class.from_pretrained(path))
    from safetensors.torch import load_file

    raw.load_state_dict(load_file(f"{path}/model.safetensors"), strict=False)
    assert raw.get_input_embeddings().weight[tok.pad_token_id].abs().sum() == 0
    assert not torch.isfinite(_grad_norm(raw.train(), batch))

    model = build_model(ModelConfig(path=path)).train()  # the learner's loading path
    emb = model.get_input_embeddings().weight
    assert emb[tok.pad_token_id].abs().sum() > 0
    # only the never-trained row changed
    others = torch.ones(len(tok), dtype=torch.bool)
    others[tok.pad_token_id] = False
    assert torch.equal(emb[others], raw.get_input_embeddings().weight[others])
    # the same fill on every load (ranks and resumes agree)
    again = build_model(ModelConfig(path=path))
    assert torch.equal(again.get_input_embeddings().weight, emb)

    # a short rl update (GRPO, AdamW as the learner configures it) stays finite
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    norms = []
    for _ in range(3):
        norm = _grad_norm(model, batch)
        norms.append(float(norm))
        assert torch.isfinite(norm) and norm < 1e3, norms
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
