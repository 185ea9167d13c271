"""Group-relative advantages (GRPO) and MiniMax-01's balanced advantages.

Rewards come as a flat ``[N]`` tensor where each run of ``group_size`` consecutive entries
holds the samples of one prompt (the layout the rollout worker produces).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice, grouped_values

SCALES = ("group", "batch", "none")


def _unbiased_std(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (n-1) std, over ``dim`` (kept) or over everything; 0 for a single element,
    where it is undefined (the centred value is 0 there anyway)."""
    if dim is None:
        return x.std() if x.numel() > 1 else x.new_zeros(())
    if x.shape[dim] > 1:
        return x.std(dim=dim, keepdim=True)
    return torch.zeros_like(x.narrow(dim, 0, 1))


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages, one per sample: ``[N] -> [N]``.

    ``A_i = (r_i - mean_g(r)) / (std + eps)`` where ``mean_g`` is the mean of the sample's
    group of ``group_size`` consecutive rewards and ``std`` the *unbiased* (n-1) standard
    deviation of the group (``scale="group"``, DeepSeekMath, Shao et al. 2024), of the whole
    batch (``scale="batch"``, Liu et al. 2025 "Tricks or Traps"), or no division at all
    (``scale="none"``, Dr. GRPO, Liu et al. 2025). ``eps`` is added to the std, outside the
    square root, as TRL does. A group whose rewards are all equal gets advantages 0.
    The mean is always per group; only the scale differs. Integer/bool rewards are cast to
    float32; NaN/inf rewards raise ``ValueError``. The result is detached.
    """
    check_choice("scale", scale, SCALES)
    grouped = grouped_values("rewards", rewards, group_size)  # [N/G, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_unbiased_std(grouped, dim=1) + eps)
    elif scale == "batch":
        centred = centred / (_unbiased_std(grouped.reshape(-1)) + eps)
    return centred.reshape(-1)


def balanced_advantages(advantages: Tensor, group_size: int, *, lengths: Tensor | None = None) -> Tensor:
    """MiniMax-01's balanced advantage estimation (one reading of it): ``[N] -> [N]``.

    MiniMax-01 (2025) says positive and negative samples should contribute equitably but gives
    no formula. We rescale, within each group, the positive advantages by ``M / P`` and the
    negative ones by ``M / Q`` where ``P = sum_i w_i A_i^+``, ``Q = sum_i w_i |A_i^-|`` and
    ``M = (P + Q) / 2``, so both sides carry the same total weighted magnitude and the group's
    total magnitude is unchanged. ``w_i`` is the token count ``lengths[i]`` when given (what a
    token-mean loss actually sums: a long wrong answer otherwise outweighs a short right one)
    or 1. With ``w_i = 1`` mean-centred advantages are already balanced (``P == Q``), so this
    is the identity for ``group_advantages`` output; it matters with ``lengths`` or for
    advantages that are not centred. Groups with only one sign are left unchanged.
    """
    grouped = grouped_values("advantages", advantages, group_size)  # [N/G, G]
    if lengths is None:
        weights = torch.ones_like(grouped)
    else:
        weights = grouped_values("lengths", lengths, group_size).to(grouped.dtype)
        if bool((weights < 0).any()):
            raise ValueError("lengths must be >= 0")
    pos_total = (weights * grouped.clamp(min=0)).sum(dim=1, keepdim=True)  # [N/G, 1]
    neg_total = (weights * (-grouped).clamp(min=0)).sum(dim=1, keepdim=True)
    both = (pos_total > 0) & (neg_total > 0)
    target = (pos_total + neg_total) / 2
    one = torch.ones_like(target)
    pos_scale = torch.where(both, target / torch.where(both, pos_total, one), one)
    neg_scale = torch.where(both, target / torch.where(both, neg_total, one), one)
    balanced = torch.where(grouped > 0, grouped * pos_scale, grouped * neg_scale)
    return balanced.reshape(-1)
