"""The hf engine on a standard transformers model (Qwen2): one left-padded generate call for
prompts of mixed lengths, exact log-probs all the same, and sampling over the whole vocabulary
when the request sets no top-k (transformers would otherwise apply its default top_k=50)."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams


def qwen2(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mixed_lengths_one_padded_call_exact_logprobs(prompts, recompute_logprobs, temperature, monkeypatch):
    model = qwen2(64)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: greedy has no near-ties
    engine = HFEngine(model)
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw))
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=10, seed=0)
    completions = engine.generate(prompts, params)
    assert calls == [(len(prompts) * 3, max(map(len, prompts)))]  # every row in one call
    for c in completions:
        ref = recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0), (c, ref)
    if temperature == 0.0:  # padding changes nothing: each prompt alone gives the same tokens
        for p, prompt in enumerate(prompts):
            (alone,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=10))
            assert all(c.token_ids == alone.token_ids for c in completions if c.prompt_index == p)


def test_no_top_k_samples_the_whole_vocabulary():
    """A near-uniform model over 128 tokens: with top_k 0 (off) about 60% of first tokens rank
    below the 50 most likely; transformers' default top_k=50 would allow none."""
    model = qwen2(128)
    prompt = [1, 5, 9, 13]
    engine = HFEngine(model)
    completions = engine.generate([prompt], SamplingParams(n=64, temperature=1.0, max_new_tokens=1, seed=0))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    rank = {t: r for r, t in enumerate(logits.argsort(descending=True).tolist())}
    beyond = sum(rank[c.token_ids[0]] >= 50 for c in completions)
    assert beyond >= 16, beyond
