"""Loss inputs shaped exactly as the rl and dpo stages feed a loss, on toy values.

Policy inputs (``[B, T]`` over completion positions, right-padded, a row per sampled
sequence): varied completion lengths (one full-width row, one single-token row), values 0
at padding like the learner's log-probs, advantages from ``group_advantages`` of 0/1 rewards
in groups (so some groups are all-equal and get advantage 0). Preference inputs: per-pair
sequence log-probs ``[B]`` (sums over a response's tokens) and response lengths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class PolicyLossInputs:
    """What a policy loss receives for one micro-batch (see posttrain.algorithms.custom)."""

    logprobs: Tensor  # [B, T] current policy, 0 at padding
    old_logprobs: Tensor  # [B, T] sampling policy (detached), 0 at padding
    advantages: Tensor  # [B]
    mask: Tensor  # [B, T] float 0/1
    ref_logprobs: Optional[Tensor] = None  # [B, T] frozen reference, 0 at padding
    is_weight: Optional[Tensor] = None  # [B, T] TIS/MIS weight (detached)

    @property
    def num_tokens(self) -> float:
        return float(self.mask.sum())

    @property
    def num_sequences(self) -> float:
        return float(self.mask.shape[0])

    def tensors(self) -> dict[str, Optional[Tensor]]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "PolicyLossInputs":
        return dataclasses.replace(self, **changes)

    def to(self, dtype: torch.dtype) -> "PolicyLossInputs":
        """Floating fields in ``dtype`` (the mask stays 0/1)."""
        return PolicyLossInputs(**{k: None if v is None else v.to(dtype) for k, v in self.tensors().items()})

    def rows(self, index: Tensor, *, trim: bool = False) -> "PolicyLossInputs":
        """The micro-batch of rows ``index``; ``trim`` cuts the padding to its own longest row, as
        a micro-batch collated on its own (to_rl_batch) is padded."""
        width = int(self.mask[index].sum(1).max().clamp(min=1)) if trim else self.mask.shape[1]
        return PolicyLossInputs(**{
            k: None if v is None else (v[index] if v.dim() == 1 else v[index, :width])
            for k, v in self.tensors().items()
        })


def policy_loss_inputs(B: int = 12, T: int = 10, seed: int = 0, *, group_size: int = 4, spread: float = 0.3,
                       dtype: torch.dtype = torch.float32, ref: bool = True, is_weight: bool = False
                       ) -> PolicyLossInputs:
    """A toy policy micro-batch of ``B`` sequences of at most ``T`` completion tokens.

    ``logprobs`` in [-3, -0.05]; ``old_logprobs`` and ``ref_logprobs`` differ from it by
    ``spread`` * N(0, 1) per token (``spread=0`` is on-policy); ``is_weight`` in [0.5, 1.5]. All
    are 0 at padding (``is_weight`` 1). Row lengths are random in [1, T] with at least one row
    of length T and one of length 1. ``B`` must be a multiple of ``group_size``."""
    if B < 2 or B % group_size:
        raise ValueError(f"B={B} must be >= 2 and a multiple of group_size={group_size}")
    from posttrain.algorithms import group_advantages

    g = _gen(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = T, 1
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)  # [B, T]
    logp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2.95 + 0.05) * mask
    # log-probs are <= 0; the perturbed ones are capped below 0 (logp itself is <= -0.05)
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-0.01) * mask
    refp = (logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-0.01) * mask
    weight = torch.where(mask > 0, 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64), 1.0)
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    rewards[:2] = torch.tensor([1.0, 0.0])  # at least one informative group
    adv = group_advantages(rewards, group_size).to(torch.float64)
    out = PolicyLossInputs(logp, old, adv, mask, refp if ref else None, weight if is_weight else None)
    return out.to(dtype)


@dataclass
class PreferenceLossInputs:
    """What a preference loss receives for one micro-batch of B pairs."""

    chosen_logps: Tensor  # [B] sum of the chosen response's token log-probs (policy)
    rejected_logps: Tensor  # [B]
    ref_chosen_logps: Tensor  # [B] frozen reference
    ref_rejected_logps: Tensor  # [B]
    chosen_lengths: Tensor  # [B] response token counts (float)
    rejected_lengths: Tensor  # [B]

    @property
    def num_pairs(self) -> float:
        return float(self.chosen_logps.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "PreferenceLossInputs":
        return dataclasses.replace(self, **changes)

    def to(self, dtype: torch.dtype) -> "PreferenceLossInputs":
        return PreferenceLossInputs(**{k: v.to(dtype) for k, v in self.tensors().items()})

    def rows(self, index: Tensor) -> "PreferenceLossInputs":
        return PreferenceLossInputs(**{k: v[index] for k, v in self.tensors().items()})


def preference_loss_inputs(B: int = 8, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                           spread: float = 2.0) -> PreferenceLossInputs:
    """``B`` toy pairs: responses of 2..24 tokens at -0.2..-2 nats per token; the reference's
    sequence log-probs differ from the policy's by ``spread`` * N(0, 1) nats (``spread=0``:
    policy == reference, the first DPO step)."""
    g = _gen(seed)
    lengths = torch.randint(2, 25, (2, B), generator=g).to(torch.float64)  # [2, B]
    per_token = -(torch.rand(2, B, generator=g, dtype=torch.float64) * 1.8 + 0.2)
    seq = lengths * per_token  # [2, B]
    ref = seq + spread * torch.randn(2, B, generator=g, dtype=torch.float64)
    out = PreferenceLossInputs(seq[0], seq[1], ref[0], ref[1], lengths[0], lengths[1])
    return out.to(dtype)


def rl_batch_from_samples(prompts: Sequence[list[int]], completions: Sequence[Any], rewards: Sequence[float],
                          group_size: int, *, pad_token_id: int, mask_truncated: bool = False,
                          scale: str = "group") -> Any:
    """The rl stage's own micro-batch (posttrain.objectives.RLBatch, built by its to_rl_batch)
    from engine completions (prompt-major, ``group_size`` per prompt) and their rewards, with
    group advantages (``scale`` as in group_advantages)."""
    from posttrain.algorithms import group_advantages
    from posttrain.stages.rl import Sample, to_rl_batch

    r = torch.as_tensor(list(rewards), dtype=torch.float32)
    adv = group_advantages(r, group_size, scale=scale)
    samples = [Sample(list(prompts[c.prompt_index]), c, float(x), float(x), float(a))
               for c, x, a in zip(completions, r.tolist(), adv.tolist())]
    return to_rl_batch(samples, pad_token_id, mask_truncated=mask_truncated)
