"""Rollout filters and reward shaping applied before the loss (DAPO)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import as_float, check_2d, check_finite, grouped_values, mask_bool

# Finish reasons that mean "the engine stopped because it hit the length budget" (vLLM and
# the OpenAI API say "length"; our engines follow vLLM).
TRUNCATED_REASONS = frozenset({"length"})


def dynamic_sampling_mask(rewards: Tensor, group_size: int, *, atol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling: which groups to keep, ``[N] -> bool [N // group_size]``.

    A group is kept when its rewards are not all equal (``max - min > atol``): a group where
    every sample got the same reward has zero advantage everywhere and only dilutes the batch.
    NaN rewards raise ``ValueError``. Expand to samples with
    ``mask.repeat_interleave(group_size)``.
    """
    grouped = grouped_values("rewards", rewards, group_size)  # [N/G, G]
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return spread > atol


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, Eq. 13), ``[B] -> [B]``, added to rewards.

    With ``L = lengths``, ``L_max = max_len`` and ``L_cache = cache_len``::

        0                                       if L <= L_max - L_cache
        penalty * ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
        -penalty                                if L > L_max

    so the penalty ramps linearly from 0 to ``-penalty`` over the last ``cache_len`` tokens of
    the budget. Returns float32 (or the float dtype of ``lengths``).
    """
    if not isinstance(lengths, Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor [B] of completion lengths, got {lengths!r:.80}")
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len={max_len}], got {cache_len}")
    lengths = as_float("lengths", lengths).detach()
    check_finite("lengths", lengths)
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    start = float(max_len - cache_len)
    ramp = (start - lengths) / float(cache_len)  # in [-1, 0) inside the window
    out = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    out = torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)
    return penalty * out


def truncation_mask(truncated: Tensor | Sequence[str | None], mask: Tensor) -> Tensor:
    """Zero the loss mask of truncated completions (DAPO overlong filtering): ``[B, T] -> [B, T]``.

    ``truncated`` is a bool tensor ``[B]`` or a list of ``B`` finish reasons, where ``"length"``
    means truncated (anything else, including ``None``, means the sample finished). Returns
    a mask of ``mask``'s dtype with the truncated rows set to 0.
    """
    check_2d("mask", mask)
    batch = mask.shape[0]
    if isinstance(truncated, Tensor):
        if truncated.dim() != 1 or truncated.shape[0] != batch:
            raise ValueError(f"truncated has shape {tuple(truncated.shape)}, expected ({batch},) (rows of mask)")
        if truncated.dtype != torch.bool:
            raise ValueError(f"truncated must be a bool tensor or a list of finish reasons, got {truncated.dtype}")
        flags = truncated.to(mask.device)
    else:
        reasons = list(truncated)
        if len(reasons) != batch:
            raise ValueError(f"truncated has {len(reasons)} finish reasons, expected {batch} (rows of mask)")
        flags = torch.tensor([r in TRUNCATED_REASONS for r in reasons], dtype=torch.bool, device=mask.device)
    keep = mask_bool(mask) & ~flags.unsqueeze(1)
    return keep if mask.dtype == torch.bool else keep.to(mask.dtype)
