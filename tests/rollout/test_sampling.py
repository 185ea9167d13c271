"""Sampling against transformers' logits warpers and against the distribution it claims to draw from."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from posttrain.rollout.sampling import filter_logprobs, policy_logprobs, request_generator, sample_tokens
from posttrain.rollout.types import SamplingParams


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 12, 0.6)])
def test_filter_keeps_the_same_tokens_as_transformers(temperature, top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    ours = filter_logprobs(policy_logprobs(logits, temperature), top_k, top_p)
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_sample_frequencies_follow_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=4, seed=0)
    target = torch.softmax(filter_logprobs(policy_logprobs(logits, 0.8), 4, 1.0), dim=-1)[0]
    g = request_generator(0, 0, 0)
    draws = torch.stack([sample_tokens(logits, params, [g])[0][0] for _ in range(20000)])
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    assert freq[4:].sum() == 0  # filtered tokens are never drawn
    assert torch.allclose(freq, target.double(), atol=0.015)


def test_returned_logprob_is_unrenormalised_tempered_policy():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=3)
    ids, lps = sample_tokens(logits, params, [request_generator(3, 0, i) for i in range(4)])
    expected = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, ids[:, None])[:, 0]
    assert torch.equal(lps, expected)
    assert lps.dtype == torch.float32


def test_per_request_generators_make_rows_independent_of_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, seed=7)
    batch, _ = sample_tokens(logits, params, [request_generator(7, p, 0) for p in range(3)])
    alone, _ = sample_tokens(logits[2:], params, [request_generator(7, 2, 0)])
    assert batch[2] == alone[0]
