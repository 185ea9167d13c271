"""Weights into a running engine: bucketing a state dict and loading named tensors in place.

Shared by the engines (load_weights) and by the weight sync on the learner side (buckets).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch


def weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


TensorResolver = Callable[[str], Optional[torch.Tensor]]


def load_named_tensors(
    model: torch.nn.Module,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    resolve: Optional[TensorResolver] = None,
) -> int:
    """Copy `named_tensors` into `model`'s parameters/buffers of the same name, in place.

    `resolve(name)` may map names the model does not have to a view of one of its tensors (e.g.
    checkpoint-layout expert weights into transformers' fused expert tensors); None = unknown.
    Casts to each target's dtype/device. Raises KeyError naming an unknown tensor and ValueError
    on a shape mismatch. Returns how many tensors were loaded. Shared by the hf and native engines.
    """
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    count = 0
    with torch.no_grad():
        for name, tensor in named_tensors:
            dst = targets.get(name)
            if dst is None and resolve is not None:
                dst = resolve(name)
            if dst is None:
                raise KeyError(f"load_weights: model has no parameter or buffer named {name!r}")
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}"
                )
            dst.copy_(tensor.to(device=dst.device, dtype=dst.dtype))
            count += 1
    return count
