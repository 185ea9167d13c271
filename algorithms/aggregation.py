"""How a ``[B, T]`` per-token loss becomes one scalar: the normaliser of every loss here.

Gradient accumulation and data parallelism both *sum* the gradients of micro-batch losses
(DeepSpeed/DDP average over ranks instead; see the note below). A per-token loss is
therefore exact across micro-batches and ranks only if each micro-batch divides by the
normaliser of the *whole optimizer step*: ``num_tokens`` (token_mean), ``num_sequences``
(seq_mean) or ``num_sequences * max_len`` (fixed_len). When they are left at ``None`` the
local micro-batch counts are used, which is right for a single micro-batch on one rank.

Note on rank averaging: DDP and DeepSpeed all-reduce gradients with a *mean* over the
``W`` ranks. To get the global token mean with them, pass ``num_tokens = global_tokens / W``
(or multiply the loss by ``W``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice, check_positive_count

AGGREGATIONS = ("seq_mean", "token_mean", "fixed_len")

Count = int | float | Tensor


def _denominator(value: Count | None, default: Tensor | float, name: str) -> Tensor | float:
    if value is None:
        return default
    check_positive_count(name, value)
    return value.detach() if isinstance(value, Tensor) else float(value)


def aggregate_token_loss(
    per_token: Tensor,
    mask: Tensor,
    aggregation: str = "token_mean",
    *,
    num_tokens: Count | None = None,
    num_sequences: Count | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce ``per_token`` ``[B, T]`` (already finite at padding) under ``mask`` ``[B, T]``.

    - ``"seq_mean"`` (GRPO, Shao et al. 2024): ``sum_i (sum_t l_it m_it / |o_i|) / num_sequences``
      with ``|o_i| = max(sum_t m_it, 1)``; ``num_sequences`` defaults to ``B``. Rows with no
      token contribute 0 but still count in ``B`` (as in TRL's ``loss_type="grpo"``).
    - ``"token_mean"`` (DAPO, Yu et al. 2025): ``sum_it l_it m_it / num_tokens``; ``num_tokens``
      defaults to ``sum(mask)`` (clamped to 1, so an empty mask gives 0, not NaN).
    - ``"fixed_len"`` (Dr. GRPO, Liu et al. 2025): ``sum_it l_it m_it / (num_sequences * max_len)``;
      ``max_len`` is required (the generation budget, a constant).

    ``mask`` is a float 0/1 tensor in the dtype of ``per_token``. Returns a 0-dim tensor.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    masked = per_token * mask
    rows = float(per_token.shape[0])
    if aggregation == "token_mean":
        denom = _denominator(num_tokens, mask.sum().clamp(min=1.0), "num_tokens")
        return masked.sum() / denom
    seqs = _denominator(num_sequences, rows, "num_sequences")
    if aggregation == "seq_mean":
        lengths = mask.sum(dim=1).clamp(min=1.0)  # [B]
        return (masked.sum(dim=1) / lengths).sum() / seqs
    if max_len is None:
        raise ValueError("aggregation='fixed_len' needs max_len (Dr. GRPO divides by B * max_len)")
    check_positive_count("max_len", max_len)
    return masked.sum() / (seqs * float(max_len))


def token_count(mask: Tensor) -> Tensor:
    """Number of loss tokens in ``mask`` ``[B, T]`` as a float tensor (sum this over micro-batches
    and ranks to get the ``num_tokens`` of an optimizer step)."""
    return mask.detach().to(torch.float32).sum()
