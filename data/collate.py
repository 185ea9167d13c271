"""Padded batches of tokenized examples, with next-token targets already shifted.

Convention used everywhere in the toolkit (learners must NOT shift again, and must not pass
these targets as `labels=` to a Hugging Face model, which would shift a second time):

    targets[b, t] = input_ids[b, t + 1]   if loss_mask[b][t + 1] == 1   (t + 1 inside the example)
                  = -100                  otherwise (prompt, last token, padding)

so `cross_entropy(logits[b, t], targets[b, t], ignore_index=-100)` is the loss of predicting
token t + 1 from the prefix ending at t. Padding is on the right with `pad_id`;
`attention_mask` is 1 on real tokens, 0 on padding; `position_ids[b, t] = t`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from posttrain.data.tokenize import Example

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A micro-batch. For packed rows (see posttrain.data.packing) B == 1, attention_mask is
    None and `cu_seqlens` gives the document boundaries inside the row."""

    input_ids: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, IGNORE_INDEX where not trained
    position_ids: torch.Tensor  # [B, T] long
    attention_mask: Optional[torch.Tensor] = None  # [B, T] long, 1 = real token (padded batches)
    cu_seqlens: Optional[torch.Tensor] = None  # [N + 1] int32 (packed batches)
    max_seqlen: Optional[int] = None  # longest document in the packed row

    @property
    def n_targets(self) -> int:
        """Number of trained positions: the SFT normaliser's contribution of this batch."""
        return int((self.targets != IGNORE_INDEX).sum())


def shifted_targets(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """targets[t] = input_ids[t+1] if loss_mask[t+1] else -100; the last position is -100."""
    n = len(input_ids)
    return [input_ids[t + 1] if loss_mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + ([IGNORE_INDEX] if n else [])


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad `examples` to the longest one; returns a Batch (see module docstring)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex) for ex in examples)
    if width == 0:
        raise ValueError("collate got only empty examples")
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        targets[b, :n] = torch.tensor(shifted_targets(ex.input_ids, ex.loss_mask), dtype=torch.long)
        attention_mask[b, :n] = 1
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(B, width).contiguous()
    return Batch(input_ids, targets, position_ids, attention_mask)


def to_device(batch: Any, device: Any) -> Any:
    """A micro-batch dataclass (Batch, or an objective's batch type) with every tensor field on
    `device`; other fields unchanged. CPU batches are returned as they are."""
    import dataclasses

    if getattr(device, "type", device) == "cpu":
        return batch
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(batch, **{k: v.to(device) for k, v in moved.items() if torch.is_tensor(v)})
