"""Weight sync: after each learner update, the new weights reach every rollout worker.

`WeightSync` is the process boundary (a Protocol): `push(version)` makes every rollout
worker (or the listed ones) hold the learner's current weights stamped with `version`.
Versions only grow; a rollout batch carries the version it was generated with.

`ObjectStoreWeightSync` is the implementation for CPU and small GPU runs: learner rank 0
cuts its state dict into buckets of at most `bucket_mb` MiB; each bucket is one object in
the Ray object store (produced on the learner, fetched by each worker one bucket at a time,
never copied through the driver). An NCCL broadcast from rank 0 to the workers, or CUDA IPC
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
        returns metrics (seconds, buckets, workers rebuilt on the way)."""
        ...


# ------------------------------------------------ run on learner rank 0 (module level for Ray)
def bucket_plan(model: torch.nn.Module, bucket_bytes: int) -> list[list[str]]:
    """Names of the state dict's tensors grouped into buckets of at most `bucket_bytes`
    (a larger tensor gets a bucket of its own); state-dict order."""
    from posttrain.rollout import weight_buckets

    return [[name for name, _ in b] for b in weight_buckets(model.state_dict().items(), bucket_bytes)]


def weight_bucket(model: torch.nn.Module, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, CPU copy) of the listed state-dict tensors: one bucket of a sync."""
    state = model.state_dict()
    return [(n, state[n].detach().to("cpu", copy=True)) for n in names]


class ObjectStoreWeightSync:
    """Bucketed weights through the Ray object store (see the module docstring).

    learners: a posttrain.cluster.LearnerGroup; rollouts: a posttrain.cluster.RolloutGroup.
    The bucket plan is computed once (the set of tensors does not change during a stage)."""

    def __init__(self, learners: Any, rollouts: Any, *, bucket_mb: float, version: int = 0):
        self.learners, self.rollouts = learners, rollouts
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.version = version
        self._plan: Optional[list[list[str]]] = None

    def push(self, version: int, workers: Optional[Sequence[int]] = None) -> dict[str, float]:
        if version < self.version:
            raise ValueError(f"weight sync: version {version} is older than the last pushed {self.version}")
        start = time.perf_counter()
        if self._plan is None:
            self._plan = self.learners.call_rank0(bucket_plan, self.bucket_bytes)
        refs = [self.learners.call_rank0_async(weight_bucket, names) for names in self._plan]
        replaced = self.rollouts.update_weights(refs, version, workers)
        self.version = version
        return {"sync/seconds": time.perf_counter() - start, "sync/buckets": float(len(refs)),
                "sync/replaced_workers": float(len(replaced))}
