"""Packed rows: several documents back to back in one row of a batch.

Convention used by every model entry point in posttrain.models: a packed batch is a single
row (B == 1) of T tokens plus `cu_seqlens`, an int32 tensor `[N+1]` of cumulative document
lengths (cu[0] = 0, cu[N] = T, strictly increasing). Documents are contiguous and never
see each other: lightning layers restart from a zero state at each boundary, softmax layers
use a block-diagonal causal mask. RoPE positions restart at 0 in each document unless the
caller passes its own `position_ids`.
"""
from __future__ import annotations

import torch

__all__ = [
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "document_ids",
    "positions_from_cu_seqlens",
    "block_causal_mask",
]


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    """Document lengths `[N]` -> int32 cu_seqlens `[N+1]`."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    if lengths.dim() != 1 or bool((lengths <= 0).any()):
        raise ValueError(f"document lengths must be a 1-D list of positive ints, got {lengths.tolist()}")
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """A packed row's positions `[1, T]` (restarting at 0 per document) -> int32 cu_seqlens `[N+1]`."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"position_ids must be [1, T] for a packed row, got {tuple(position_ids.shape)}")
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids of a packed row must start at 0")
    end = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def document_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens `[N+1]` -> document index of every token `[T]` (long)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in each document, `[1, T]` (long)."""
    doc = document_ids(cu_seqlens)
    t = torch.arange(doc.numel(), device=cu_seqlens.device)
    return (t - cu_seqlens.long()[doc]).unsqueeze(0)


def block_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask `[1, 1, T, T]`: True where query i may attend key j (same document, j <= i)."""
    doc = document_ids(cu_seqlens)
    t = torch.arange(doc.numel(), device=cu_seqlens.device)
    allowed = (doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None])
    return allowed[None, None]
