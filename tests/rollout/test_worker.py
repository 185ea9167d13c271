"""RolloutWorker: engine by name, versioned bucketed weight updates that really change outputs."""
import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.models.hybrid import HybridForCausalLM
from posttrain.rollout.types import SamplingParams
from posttrain.rollout import RolloutConfig, RolloutWorker, weight_buckets


@pytest.fixture(scope="module")
def new_policy(hf_tiny):
    """Different weights with the same architecture, as a learner (our model class) holds them."""
    from transformers import MiniMaxConfig

    torch.manual_seed(1)
    model = HybridForCausalLM(MiniMaxConfig(**hf_tiny.config.to_dict())).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_update_weights_switches_policy(engine, tiny_dir, new_policy, prompts, recompute_logprobs):
    worker = RolloutWorker.from_model_config(
        RolloutConfig(engine=engine, max_slots=4, weight_bucket_mb=0.02), ModelConfig(path=tiny_dir))
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    sampled = SamplingParams(n=2, temperature=0.8, max_new_tokens=10, seed=0)
    before = worker.generate(prompts, greedy)
    assert before.policy_version == 0 and len(before.completions) == len(prompts) * 2

    named = [(n, p.detach().clone()) for n, p in new_policy.named_parameters()]
    loaded = worker.update_weights(iter(named), version=3)
    assert loaded == len(named)

    after, after_sampled = worker.generate(prompts, greedy), worker.generate(prompts, sampled)
    assert after.policy_version == 3 and worker.policy_version == 3
    assert [c.token_ids for c in after.completions] != [c.token_ids for c in before.completions]
    pairs = [(c, 0.0) for c in after.completions] + [(c, 0.8) for c in after_sampled.completions]
    for c, t in pairs:
        ref = recompute_logprobs(new_policy, prompts[c.prompt_index], c.token_ids, t)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # greedy tokens are the new policy's argmax
        c = after.completions[0]
        logits = new_policy(torch.tensor([prompts[0] + c.token_ids])).logits[0, len(prompts[0]) - 1 : -1]
    assert c.token_ids == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="older than current 3"):
        worker.update_weights([], version=2)


def test_generate_metrics(tiny_dir, prompts):
    worker = RolloutWorker.from_model_config(RolloutConfig(engine="native", max_slots=3), ModelConfig(path=tiny_dir))
    batch = worker.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0, stop_token_ids=(2, 3)))
    m = batch.metrics
    assert m["rollout/tokens"] == sum(len(c.token_ids) for c in batch.completions)
    assert m["rollout/stop_frac"] + m["rollout/length_frac"] + m["rollout/truncated_frac"] == pytest.approx(1.0)
    assert m["rollout/tokens_per_s"] > 0


def test_weight_buckets_respect_size():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # fp32: 4 B each
    buckets = list(weight_buckets(iter(tensors), bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]


def test_config_rejects_unknown_engine():
    with pytest.raises(ValueError, match="'sglang' is not one of"):
        RolloutConfig(engine="sglang")
    with pytest.raises(ValueError, match="kv_cache_mb: must be null or a finite number > 0"):
        RolloutConfig(engine="vllm", kv_cache_mb=0)


def test_preset_workers_build_both_engines():
    """hf runs transformers' MiniMaxForCausalLM, native our model, from the same preset config."""
    cfg = ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2})
    native = RolloutWorker.from_model_config(RolloutConfig(engine="native", max_slots=2), cfg, vocab_size=48)
    hf = RolloutWorker.from_model_config(RolloutConfig(engine="hf"), cfg, vocab_size=48)
    assert type(hf.engine.model).__name__ == "MiniMaxForCausalLM"
    hf.update_weights(native.engine.model.named_parameters(), version=1)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    a = native.generate([[1, 2, 3]], params).completions[0]
    b = hf.generate([[1, 2, 3]], params).completions[0]
    assert a.token_ids == b.token_ids
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
