"""Packing tokenized examples into rows of at most `max_seq_len` tokens (long-context SFT).

Each row holds several documents back to back, with no padding. Inside a row:

- targets follow posttrain.data.collate (targets[t] = input_ids[t+1] if trained), computed per
  document, so the last position of every document is -100: the first token of a document is
  never the target of the previous document;
- position_ids restart at 0 at every document;
- cu_seqlens (int32, [N+1]) are the cumulative document lengths, 0 first and the row length
  last, as flash-attention varlen kernels and the lightning-attention kernels expect; attention
  and recurrent state must not cross these boundaries (`block_causal_mask` builds the
  equivalent dense mask for attention implementations without varlen support).

Modes for examples longer than max_seq_len:

- "bfd": the example is truncated to its first max_seq_len tokens (a warning gives the count;
  encode_sft with max_len <= max_seq_len never produces such examples).
- "split": the example is cut into pieces of at most max_seq_len tokens that overlap by one
  token: piece k+1 starts with the last token of piece k. Each piece is its own document
  (positions restart, it cannot see earlier pieces). Every piece keeps the loss mask of its
  tokens except its first token, which is never a target in any document; thanks to the
  one-token overlap that token was already a target at the end of the previous piece, so
  the pieces together train exactly the targets of the original example and contain all its
  tokens. Needs max_seq_len >= 2.

Rows are then filled by best-fit decreasing: documents sorted by length (longest first, ties
in input order), each placed into the open row with the least room that still fits it.
"""
from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

from posttrain.data.collate import Batch, shifted_targets
from posttrain.data.tokenize import Example


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # [T] long, T <= max_seq_len
    targets: torch.Tensor  # [T] long, -100 where not trained
    position_ids: torch.Tensor  # [T] long, restarting at 0 per document
    cu_seqlens: torch.Tensor  # [N + 1] int32, N documents

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to bins of `capacity`; returns, per bin, the indices of its items.

    Best-fit decreasing: longest item first, into the bin with the least remaining room that
    fits it, or a new bin. Every length must be in [1, capacity].
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        j = bisect.bisect_left(room, (lengths[i], -1))
        if j == len(room):
            bins.append([i])
            bisect.insort(room, (capacity - lengths[i], len(bins) - 1))
        else:
            left, b = room.pop(j)
            bins[b].append(i)
            bisect.insort(room, (left - lengths[i], b))
    return bins


def split_example(ex: Example, max_seq_len: int) -> list[Example]:
    """Cut an example into pieces of <= max_seq_len tokens overlapping by one token."""
    if max_seq_len < 2:
        raise ValueError(f"split needs max_seq_len >= 2, got {max_seq_len}")
    n = len(ex)
    if n <= max_seq_len:
        return [ex]
    pieces: list[Example] = []
    start = 0
    while True:
        end = min(start + max_seq_len, n)
        # The first token of a piece is context only (never a target), hence mask 0.
        mask = [0] + list(ex.loss_mask[start + 1 : end])
        pieces.append(Example(list(ex.input_ids[start:end]), mask, truncated=ex.truncated))
        if end == n:
            return pieces
        start = end - 1


def _documents(examples: Sequence[Example], max_seq_len: int, mode: str) -> list[Example]:
    docs: list[Example] = []
    n_cut = 0
    for ex in examples:
        if len(ex) == 0:
            continue
        if len(ex) <= max_seq_len:
            docs.append(ex)
        elif mode == "split":
            docs.extend(split_example(ex, max_seq_len))
        else:
            n_cut += 1
            docs.append(Example(list(ex.input_ids[:max_seq_len]), list(ex.loss_mask[:max_seq_len]), truncated=True))
    if n_cut:
        warnings.warn(f"pack: truncated {n_cut} examples longer than max_seq_len={max_seq_len} (use mode='split' to keep them whole)")
    return docs


def _row(docs: Sequence[Example]) -> PackedRow:
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    cu = [0]
    for d in docs:
        ids += d.input_ids
        targets += shifted_targets(d.input_ids, d.loss_mask)
        positions += range(len(d))
        cu.append(cu[-1] + len(d))
    return PackedRow(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(cu, dtype=torch.int32),
    )


def pack(
    examples: Sequence[Example],
    max_seq_len: int,
    *,
    mode: Literal["bfd", "split"] = "bfd",
) -> list[PackedRow]:
    """Pack examples into rows of at most max_seq_len tokens (see module docstring).

    Deterministic: the same examples give the same rows. Empty examples are ignored.
    """
    if mode not in ("bfd", "split"):
        raise ValueError(f'pack mode must be "bfd" or "split", got {mode!r}')
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    docs = _documents(examples, max_seq_len, mode)
    bins = best_fit_decreasing([len(d) for d in docs], max_seq_len)
    return [_row([docs[i] for i in b]) for b in bins]


def collate_packed(rows: Union[PackedRow, Sequence[PackedRow]]) -> Batch:
    """One packed micro-batch of shape [1, T]: a single row, or several rows joined end to end.

    Joining is exact because documents never interact across cu_seqlens boundaries; the
    joined row is longer than max_seq_len, so pass one row per micro-batch to respect a
    memory budget. attention_mask is None: use cu_seqlens (or block_causal_mask).
    """
    rows = [rows] if isinstance(rows, PackedRow) else list(rows)
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    cu = torch.cat([rows[0].cu_seqlens[:1]] + [r.cu_seqlens[1:] + off for r, off in zip(rows, offsets)])
    return Batch(
        input_ids=torch.cat([r.input_ids for r in rows]).unsqueeze(0),
        targets=torch.cat([r.targets for r in rows]).unsqueeze(0),
        position_ids=torch.cat([r.position_ids for r in rows]).unsqueeze(0),
        attention_mask=None,
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=max(r.max_seqlen for r in rows),
    )


def block_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Dense [T, T] bool mask, True where query t may attend key s (same document, s <= t)."""
    T = int(cu_seqlens[-1])
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())  # [T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return causal & (doc[:, None] == doc[None, :])
