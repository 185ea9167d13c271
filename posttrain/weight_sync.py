"""Weight sync: after each learner update, the new weights reach every rollout worker.

`WeightSync` is the process boundary (a Protocol): `push(version)` makes every rollout
worker (or the listed ones) hold the learner's current weights stamped with `version`.
Versions only grow; a rollout batch carries the version it was generated with.

`ObjectStoreWeightSync` is the implementation for CPU and small GPU runs: learner rank 0
cuts its state dict into buckets of at most `bucket_mb` MiB; each bucket is one object in
the Ray object store (produced on the learner, fetched by each worker one bucket at a time,
never copied through the driver). With LoRA the workers receive merged weights (base +
scale * B A), and after the first push only the adapted tensors. An NCCL broadcast from rank 0 to the workers, or CUDA IPC
handles for co-located engines, would implement the same Protocol.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Protocol, Sequence

import torch


class WeightSync(Protocol):
    version: int

    def push(self, version: int, workers: Optional[Sequence[int]] = None) -> dict[str, float]:
        """Send the learner's current weights to `workers` (default: all) as `version`;
        returns metrics (seconds, MiB, buckets)."""
        ...


# ------------------------------------------------ run on learner rank 0 (module level for Ray)
def bucket_plan(model: torch.nn.Module, bucket_bytes: int, changing_only: bool = False) -> list[list[str]]:
    """Names of the model's weights (a plain checkpoint's names; LoRA adapters merged, see
    posttrain.lora.merged_state) grouped into buckets of at most `bucket_bytes` (a larger tensor
    gets a bucket of its own), in state-dict order. changing_only: only the tensors training can
    change (with LoRA: the adapted weights and fully trained modules; else every tensor)."""
    from posttrain.lora import merged_state
    from posttrain.rollout import weight_buckets

    items = [(n, t.like) for n, t in merged_state(model).items() if t.changing or not changing_only]
    return [[name for name, _ in b] for b in weight_buckets(items, bucket_bytes)]


def weight_bucket(model: torch.nn.Module, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, CPU copy) of the listed tensors (adapters merged): one bucket of a sync."""
    from posttrain.lora import merged_tensors

    return merged_tensors(model, names)


class ObjectStoreWeightSync:
    """Bucketed weights through the Ray object store (see the module docstring).

    learners: a posttrain.cluster.LearnerGroup; rollouts: a posttrain.cluster.RolloutGroup.
    The first push, and a push to listed workers (rebuilt from the init checkpoint), sends every
    tensor; later pushes only those training can change (bucket_plan's changing_only: with LoRA
    the merged adapted weights, a few percent of the model). Both plans are computed once: the
    set of tensors does not change during a stage."""

    def __init__(self, learners: Any, rollouts: Any, *, bucket_mb: float, version: int = 0):
        self.learners, self.rollouts = learners, rollouts
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.version = version
        self._plans: dict[bool, list[list[str]]] = {}
        self._pushed = False

    def push(self, version: int, workers: Optional[Sequence[int]] = None) -> dict[str, float]:
        if version < self.version:
            raise ValueError(f"weight sync: version {version} is older than the last pushed {self.version}")
        start = time.perf_counter()
        changing_only = self._pushed and workers is None
        if changing_only not in self._plans:
            self._plans[changing_only] = self.learners.call_rank0(bucket_plan, self.bucket_bytes, changing_only)
        plan = self._plans[changing_only]
        refs = [self.learners.call_rank0_async(weight_bucket, names) for names in plan]
        self.rollouts.update_weights(refs, version, workers)
        self.version = version
        self._pushed = self._pushed or workers is None
        return {"sync/seconds": time.perf_counter() - start, "sync/buckets": float(len(refs)),
                "sync/tensors": float(sum(len(b) for b in plan))}
