"""Weight sync: after each learner update, the new weights reach every rollout worker.

`WeightSync` is the process boundary (a Protocol): `push(version)` makes every rollout
worker (or the listed ones) hold the learner's current weights stamped with `version`.
Versions only grow; a rollout batch carries the version it was generated with.

Three implementations, chosen by `cluster.weight_sync` (`make_weight_sync`; auto: by placement):

- `ObjectStoreWeightSync` (CPU): learner rank 0 cuts its state dict into buckets of at most
  `bucket_mb` MiB; each bucket is one object in the Ray object store (produced on the learner,
  fetched by each worker one bucket at a time, never copied through the driver).
- `BroadcastWeightSync` (split placement): a process group of learner rank 0 and the rollout
  workers, of its own (not the learners' DeepSpeed world); each bucket is flattened into one
  buffer per dtype on rank 0 and broadcast, GPU to GPU over NCCL (gloo on CPU, which is how
  CI tests the same code path).
- `CudaIpcWeightSync` (colocated on GPUs): worker i shares learner rank i's GPU; the rank
  flattens each bucket on the GPU and hands the worker a CUDA IPC handle to it, which the
  worker maps and copies from: no copy through host memory, no network.

With LoRA every sync sends merged weights (base + scale * B A; posttrain.lora.merged_state),
and the object store, after the first push, only the adapted tensors.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch

from posttrain.zero3 import own_gathers

# Process groups of the weight syncs in this process (learner rank 0 or a rollout worker),
# by name: created by join_weight_group, used by later pushes, replaced when the workers change.
_GROUPS: dict[str, Any] = {}


class WeightSync(Protocol):
    version: int

    def push(self, version: int, workers: Optional[Sequence[int]] = None) -> dict[str, float]:
        """Send the learner's current weights to `workers` (default: all) as `version`;
        returns metrics (seconds, buckets, workers rebuilt on the way)."""
        ...


# ------------------------------------------------ run on learner rank 0 (module level for Ray)
@own_gathers
def bucket_plan(model: torch.nn.Module, bucket_bytes: int, changing_only: bool = False) -> list[list[str]]:
    """Names of the model's weights (a plain checkpoint's names; LoRA adapters merged, see
    posttrain.lora.merged_state) grouped into buckets of at most `bucket_bytes` (a larger tensor
    gets a bucket of its own), in state-dict order. changing_only: only the tensors training can
    change (with LoRA: the adapted weights and fully trained modules; else every tensor)."""
    from posttrain.lora import merged_state
    from posttrain.rollout import weight_buckets

    items = [(n, t.like) for n, t in merged_state(model).items() if t.changing or not changing_only]
    return [[name for name, _ in b] for b in weight_buckets(items, bucket_bytes)]


@own_gathers
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
        # A worker that died before or during the update is rebuilt and loaded by the group. With
        # LoRA the tensors left out of a later plan are the init checkpoint's, which it loads.
        replaced = self.rollouts.update_weights(refs, version, workers)
        self.version = version
        self._pushed = self._pushed or workers is None
        return {"sync/seconds": time.perf_counter() - start, "sync/buckets": float(len(refs)),
                "sync/tensors": float(sum(len(b) for b in plan)), "sync/replaced_workers": float(len(replaced))}


def make_weight_sync(cluster: Any, placement: Any, learners: Any, rollouts: Any, *, bucket_mb: float,
                     version: int = 0) -> WeightSync:
    """The weight sync `cluster.weight_sync` names; auto: CUDA IPC when colocated on GPUs, a
    broadcast when split on GPUs, the object store otherwise."""
    mode = cluster.weight_sync
    if mode == "auto":
        gpus = placement is not None and placement.gpus
        mode = ("cuda_ipc" if cluster.placement == "colocated" else "broadcast") if gpus else "object_store"
    cls = {"object_store": ObjectStoreWeightSync, "broadcast": BroadcastWeightSync,
           "cuda_ipc": CudaIpcWeightSync}[mode]
    return cls(learners, rollouts, bucket_mb=bucket_mb, version=version)


# ------------------------------------------------------------------- flattening buckets
@own_gathers
def flat_plan(model: torch.nn.Module, bucket_bytes: int) -> list[list[tuple[str, list[int], str]]]:
    """Buckets of (name, shape, dtype) of the weights the engine holds (adapters merged), at most
    `bucket_bytes` each."""
    from posttrain.lora import merged_state
    from posttrain.rollout import weight_buckets

    items = [(n, t.like) for n, t in merged_state(model).items()]
    return [[(n, list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in b]
            for b in weight_buckets(items, bucket_bytes)]


def _on_device(model: torch.nn.Module, bucket: list[tuple[str, list[int], str]]) -> list[torch.Tensor]:
    """The bucket's tensors where the learner holds them (adapters merged)."""
    from posttrain.lora import merged_state

    view = merged_state(model)
    return [view[n].get() for n, _, _ in bucket]


def flatten(tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One contiguous buffer per dtype (a bucket may mix fp32 norms and bf16 weights)."""
    by_dtype: dict[str, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[str(t.dtype).removeprefix("torch.")].append(t.detach().reshape(-1))
    return {d: torch.cat(ts) for d, ts in by_dtype.items()}


def unflatten(bucket: list[tuple[str, list[int], str]], flat: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of `bucket` as views into the per-dtype buffers of `flatten`."""
    offsets: dict[str, int] = defaultdict(int)
    for name, shape, dtype in bucket:
        n = 1
        for d in shape:
            n *= d
        yield name, flat[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)
        offsets[dtype] += n


def _sizes(bucket: list[tuple[str, list[int], str]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for _, shape, dtype in bucket:
        n = 1
        for d in shape:
            n *= d
        out[dtype] += n
    return out


# --------------------------------------------------- process-group broadcast (split mode)
@own_gathers
def join_weight_group(model: Any, name: str, addr: str, key: str, rank: int, world: int) -> None:
    """Join (or re-join) weight group `name`: rank 0 is learner rank 0 (on node `addr`), ranks
    1.. the rollout workers, meeting through rendezvous `key`. Its own store and communicator,
    beside DeepSpeed's default group; NCCL on CUDA, gloo on CPU."""
    import datetime

    import torch.distributed as tdist

    from posttrain.rendezvous import rendezvous_store

    store = rendezvous_store(key, addr, rank, world, timeout_s=300)
    if torch.cuda.is_available():
        group = tdist.ProcessGroupNCCL(store, rank, world)
    else:
        group = tdist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=300))
    _GROUPS[name] = (group, store)


def _broadcast(name: str, flat: dict[str, torch.Tensor]) -> None:
    import torch.distributed as tdist

    group = _GROUPS[name][0]
    opts = tdist.BroadcastOptions()
    opts.rootRank = 0
    for dtype in sorted(flat):
        group.broadcast([flat[dtype]], opts).wait()


@own_gathers
def broadcast_send(model: torch.nn.Module, name: str, plan: list[list[tuple[str, list[int], str]]]) -> int:
    """On learner rank 0: broadcast every bucket of the plan; returns bytes sent. The other
    learner ranks run it under ZeRO-3 (LearnerGroup's followers): they gather each bucket with
    rank 0 and send nothing."""
    import torch.distributed as tdist

    follower = tdist.is_initialized() and tdist.get_rank() != 0
    sent = 0
    for bucket in plan:
        flat = flatten(_on_device(model, bucket))
        if follower:
            continue
        _broadcast(name, flat)
        sent += sum(t.numel() * t.element_size() for t in flat.values())
    return sent


def broadcast_receive(model: torch.nn.Module, name: str, plan: list[list[tuple[str, list[int], str]]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """On a rollout worker: receive every bucket of the plan into buffers on the engine's
    device, yielding its named tensors for RolloutWorker.update_weights."""
    device = next(model.parameters()).device
    for bucket in plan:
        flat = {d: torch.empty(n, dtype=getattr(torch, d), device=device) for d, n in _sizes(bucket).items()}
        _broadcast(name, flat)
        yield from unflatten(bucket, flat)


@own_gathers
def _node_ip(model: Any) -> str:
    from posttrain.rendezvous import node_ip

    return node_ip()


class _FlatBucketSync:
    """What the broadcast and CUDA IPC syncs share: the bucket plan of (name, shape, dtype),
    computed once on learner rank 0, and the version rule."""

    def __init__(self, learners: Any, rollouts: Any, *, bucket_mb: float, version: int = 0):
        self.learners, self.rollouts = learners, rollouts
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.version = version
        self._plan: Optional[list] = None

    def _plan_for(self, version: int) -> list:
        if version < self.version:
            raise ValueError(f"weight sync: version {version} is older than the last pushed {self.version}")
        if self._plan is None:
            self._plan = self.learners.call_rank0(flat_plan, self.bucket_bytes)
        return self._plan


class BroadcastWeightSync(_FlatBucketSync):
    """Bucketed broadcast from learner rank 0 to every rollout worker (see the module docstring).
    The group is built on the first push and rebuilt when workers were replaced."""

    _name = "rollout-weights"

    def __init__(self, learners: Any, rollouts: Any, *, bucket_mb: float, version: int = 0):
        super().__init__(learners, rollouts, bucket_mb=bucket_mb, version=version)
        self._joined = False

    def _join(self) -> None:
        import ray

        from posttrain.rendezvous import forget_rendezvous, rendezvous_key

        addr, key = self.learners.call_rank0(_node_ip), rendezvous_key(self._name)
        world = 1 + len(self.rollouts)
        refs = [self.learners.call_rank0_alone_async(join_weight_group, self._name, addr, key, 0, world)]
        refs += [a.call.remote(join_weight_group, self._name, addr, key, 1 + i, world)
                 for i, a in enumerate(self.rollouts.actors)]
        ray.get(refs)
        forget_rendezvous(key)  # every rank has joined: the store is connected
        self._joined = True

    def push(self, version: int, workers: Optional[Sequence[int]] = None) -> dict[str, float]:
        import ray

        start = time.perf_counter()
        self._plan_for(version)
        if workers is not None or not self._joined:  # replaced workers: a new group with everyone
            self._join()
        send = self.learners.call_rank0_async(broadcast_send, self._name, self._plan)
        recv = [a.load_with.remote(broadcast_receive, version, self._name, self._plan) for a in self.rollouts.actors]
        sent, *_ = ray.get([send, *recv])
        self.version = version
        return {"sync/seconds": time.perf_counter() - start, "sync/buckets": float(len(self._plan)),
                "sync/mib": sent / 2**20}


# ------------------------------------------------------------- CUDA IPC (colocated mode)
_KEEP: list[Any] = []  # the learner's flattened buckets, alive until the workers copied them


@own_gathers
def ipc_handles(model: torch.nn.Module, bucket: list[tuple[str, list[int], str]]) -> dict[str, Any]:
    """On a learner rank: the bucket flattened on its GPU, as CUDA IPC handles (one per dtype)
    that a process on the same GPU can map without a copy."""
    from torch.multiprocessing.reductions import reduce_tensor

    flat = flatten(_on_device(model, bucket))
    _KEEP.append(flat)
    return {d: reduce_tensor(t) for d, t in flat.items()}


@own_gathers
def release_ipc(model: Any) -> None:
    _KEEP.clear()
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


def ipc_receive(model: torch.nn.Module, plan: list[list[tuple[str, list[int], str]]], handles: list[dict[str, Any]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """On a rollout worker: map each bucket's IPC buffers (the learner's GPU memory) and yield
    its named tensors; update_weights copies them into the engine."""
    for bucket, h in zip(plan, handles):
        flat = {d: rebuild(*args) for d, (rebuild, args) in h.items()}
        yield from unflatten(bucket, flat)


class CudaIpcWeightSync(_FlatBucketSync):
    """Worker i copies from learner rank (i mod learners) on the same GPU through CUDA IPC
    handles (ZeRO 0-2 keep full parameters on every rank; under ZeRO-3 every rank gathers each
    bucket). See the module docstring."""

    def push(self, version: int, workers: Optional[Sequence[int]] = None) -> dict[str, float]:
        import ray

        start = time.perf_counter()
        self._plan_for(version)
        idx = list(range(len(self.rollouts))) if workers is None else list(workers)
        ranks = sorted({i % self.learners.world_size for i in idx})
        if self.learners.gathers:  # ZeRO-3: every rank gathers each bucket, whether a worker reads it or not
            ranks = list(range(self.learners.world_size))
        # every rank's calls are queued before any answer is awaited: under ZeRO-3 they gather together
        refs = {r: [self.learners.call_rank_async(r, ipc_handles, b) for b in self._plan] for r in ranks}
        handles = {r: ray.get(refs[r]) for r in ranks}
        try:
            ray.get([self.rollouts.actors[i].load_with.remote(
                ipc_receive, version, self._plan, handles[i % self.learners.world_size]) for i in idx])
        finally:
            ray.get([self.learners.call_rank_async(r, release_ipc) for r in ranks])
        self.version = version
        size = sum(n * torch.tensor([], dtype=getattr(torch, d)).element_size()
                   for b in self._plan for d, n in _sizes(b).items())
        return {"sync/seconds": time.perf_counter() - start, "sync/buckets": float(len(self._plan)),
                "sync/mib": size / 2**20}
