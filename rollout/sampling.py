"""Token sampling shared by the engines: temperature, top-k, top-p, per-request generators.

Reproducibility: each request (prompt_index, sample_index) owns a CPU `torch.Generator` seeded
from (seed, prompt_index, sample_index) and consumes exactly one uniform per generated token.
A request therefore draws the same random numbers whatever slot it lands in, whatever else is
in the batch and however many slots exist; its tokens then depend only on its own logits.
Sampling is by inverse CDF over the filtered distribution (float64 cumulative sums).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from posttrain.rollout.types import SamplingParams

# Large odd multipliers keep (seed, prompt, sample) -> generator seed injective for realistic
# ranges (< 2^20 samples per prompt, < 2^20 prompts) and well mixed by the Philox/MT seeding.
_PROMPT_MULT = 1_000_003
_SAMPLE_MULT = 2_000_029


def request_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """A CPU generator private to one request; see the module docstring."""
    g = torch.Generator(device="cpu")
    mixed = (seed * 0x9E3779B1 + prompt_index * _PROMPT_MULT + sample_index * _SAMPLE_MULT) % (2**63 - 1)
    g.manual_seed(mixed)
    return g


def policy_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log softmax(logits / T) over the vocabulary; T == 0 (greedy) uses T = 1.

    logits: [B, V] raw LM-head logits. Returns [B, V] fp32.
    """
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / t, dim=-1)


def filter_logprobs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set excluded tokens to -inf (top-k first, then top-p nucleus, as transformers does).

    logprobs: [B, V] fp32 temperature-scaled log-probs. Ties at the k-th value are kept; top-p keeps
    the smallest prefix (by descending prob) whose mass reaches top_p, always at least one token.
    """
    out = logprobs
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # [B, 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_lp.exp()
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _uniforms(generators: Optional[Sequence[torch.Generator]], batch: int) -> torch.Tensor:
    """[B] float64 uniforms in [0, 1): one draw per row from its own generator (or the global RNG)."""
    if generators is None:
        return torch.rand(batch, dtype=torch.float64)
    if len(generators) != batch:
        raise ValueError(f"sample_tokens: {len(generators)} generators for a batch of {batch}")
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: Optional[Sequence[torch.Generator]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    logits: [B, V] raw LM-head logits (any float dtype; computed on in fp32).
    generators: one per row (see request_generator) or None for the global RNG.
    Returns (ids [B] int64, logprobs [B] fp32) with logprobs = log_softmax(logits / T)[ids],
    NOT renormalised after top-k/top-p (see posttrain.rollout.types).
    """
    lp = policy_logprobs(logits, params.temperature)  # [B, V]
    if params.greedy:
        ids = lp.argmax(dim=-1)
    else:
        filtered = filter_logprobs(lp, params.top_k, params.top_p)
        cdf = filtered.double().exp().cumsum(dim=-1)  # [B, V], un-normalised after filtering
        u = _uniforms(generators, lp.shape[0]).to(cdf.device)  # [B]
        target = (u * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
        # First index whose cumulative mass exceeds the target: never a zero-probability token.
        ids = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(lp.shape[-1] - 1)
    return ids, lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def early_stop_length(logprobs: Sequence[float], run: Optional[int], prob: float) -> Optional[int]:
    """MiniMax-M1 early truncation applied to a finished sequence of token log-probs.

    Returns the number of tokens to keep (up to and including the token that completes `run`
    consecutive tokens with probability > prob), or None if no such run exists / run is None.
    Equivalent to stopping online, since later tokens never influence earlier log-probs.
    """
    if run is None:
        return None
    threshold = math.log(prob)
    streak = 0
    for i, lp in enumerate(logprobs):
        streak = streak + 1 if lp > threshold else 0
        if streak >= run:
            return i + 1
    return None
