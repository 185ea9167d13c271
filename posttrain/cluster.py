"""Ray: start (or join) the cluster and host learners and rollout workers as actors.

This is the only module that wraps plain classes with `ray.remote`; everything else is
tested without Ray. `LearnerGroup` fans each call out to all DeepSpeed ranks and returns
rank 0's answer (metrics are already all-reduced by the learner). `RolloutGroup` hosts
`cluster.rollout_workers` RolloutWorkers, shards prompts across them and replaces dead ones.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from posttrain.models import ModelConfig
from posttrain.objectives.common import Objective, StepCounts

# `auto`, `host:port` or `ray://host:port` (Ray Client); the host a name or an IPv4 address.
_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:\d{1,5})$")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the processes run (the recipe's `cluster:`)."""

    address: Optional[str] = None  # null: start a local Ray instance; else join `auto`, host:port or ray://host:port
    num_cpus: Optional[int] = None  # CPUs of the local Ray instance (default: all)
    learners: int = 1  # DeepSpeed data-parallel ranks (one Ray actor each)
    rollout_workers: int = 1  # rollout actors of an rl stage
    cpus_per_learner: float = 1.0  # Ray CPU resource each learner reserves
    cpus_per_rollout_worker: float = 0.0  # Ray CPU resource each rollout worker reserves
    # torch intra-op threads in each learner and rollout process. 1 by default: learners and
    # workers share the machine, and oversubscribed OpenMP threads spin - a tiny-model SFT
    # step measured 0.27 s with 1 thread and 2.4 s with 2 on a busy 2-core machine.
    torch_threads: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.address is None or bool(_ADDRESS.match(self.address)), "address",
             f"expected null, 'auto', host:port or ray://host:port, got {self.address!r}"),
            (self.num_cpus is None or self.num_cpus >= 1, "num_cpus", f"must be null or >= 1, got {self.num_cpus}"),
            (self.learners >= 1, "learners", f"must be >= 1, got {self.learners}"),
            (self.rollout_workers >= 1, "rollout_workers", f"must be >= 1, got {self.rollout_workers}"),
            (self.cpus_per_learner >= 0, "cpus_per_learner", f"must be >= 0, got {self.cpus_per_learner}"),
            (self.cpus_per_rollout_worker >= 0, "cpus_per_rollout_worker",
             f"must be >= 0, got {self.cpus_per_rollout_worker}"),
            (self.torch_threads >= 1, "torch_threads", f"must be >= 1, got {self.torch_threads}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")


def start_ray(cluster: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cluster.address:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(num_cpus=cluster.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerGroup:
    """`cluster.learners` DeepSpeed ranks, each a Ray actor holding a `Learner`."""

    def __init__(self, cluster: ClusterConfig, model_cfg: ModelConfig, init_path: Optional[str],
                 *, token_ids: dict[str, Any], seed: int):
        import ray

        from posttrain.learner import DistInfo, Learner

        world = cluster.learners
        port = _free_port()
        threads = cluster.torch_threads
        actor_cls = ray.remote(num_cpus=cluster.cpus_per_learner)(Learner)
        self.actors = [
            actor_cls.remote(model_cfg, init_path, token_ids=token_ids, seed=seed,
                             dist=DistInfo(rank, world, "127.0.0.1", port), threads=threads)
            for rank in range(world)
        ]
        self.world_size = world

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def _each(self, method: str, per_rank: list[Any], **kwargs: Any) -> list[Any]:
        import ray

        return ray.get([getattr(a, method).remote(arg, **kwargs) for a, arg in zip(self.actors, per_rank)])

    def configure(self, optim: Any, schedule: Any, learner: Any, total_steps: int) -> None:
        self._all("configure", optim, schedule, learner, total_steps)

    def train_step(self, objective: Objective, per_rank: list[list[Any]], counts: StepCounts) -> dict[str, float]:
        import ray

        return ray.get([a.train_step.remote(objective, mb, counts) for a, mb in zip(self.actors, per_rank)])[0]

    def evaluate(self, objective: Objective, per_rank: list[list[Any]], counts: StepCounts) -> dict[str, float]:
        import ray

        return ray.get([a.evaluate.remote(objective, mb, counts) for a, mb in zip(self.actors, per_rank)])[0]

    def call_rank0(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(rank 0's model, *args) on the learner: generation, old / reference log-probs."""
        import ray

        return ray.get(self.actors[0].call.remote(fn, *args))

    def call_rank0_async(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Like call_rank0 but returns the ObjectRef: the result stays in the object store
        (weight buckets go learner -> rollout workers without passing through the driver)."""
        return self.actors[0].call.remote(fn, *args)

    def state_dict(self) -> dict:
        import ray

        return ray.get(self.actors[0].state_dict.remote())

    def save_pretrained(self, out_dir: str) -> None:
        self._all("save_pretrained", out_dir)

    def save_state(self, state_dir: str, extra: dict) -> None:
        self._all("save_state", state_dir, extra)

    def load_state(self, state_dir: str) -> dict:
        return self._all("load_state", state_dir)[0]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


# ------------------------------------------------------------------------------ rollouts
class RolloutWorkerLost(RuntimeError):
    """A rollout worker died; `replaced` lists the indices rebuilt from the init checkpoint
    (they still need the current weights and version, see posttrain.weight_sync)."""

    def __init__(self, replaced: list[int], cause: str):
        super().__init__(f"rollout workers {replaced} died ({cause}); replaced from the init checkpoint")
        self.replaced = replaced


class RolloutHost:
    """What one rollout actor holds: a `posttrain.rollout.RolloutWorker` built from the stage's
    init checkpoint (or the preset), plus the glue Ray needs (threads, bucket refs)."""

    def __init__(self, rollout_cfg: Any, model_cfg: ModelConfig, init_path: Optional[str], *,
                 token_ids: dict[str, Any], threads: int):
        import torch

        from posttrain.rollout import RolloutWorker

        torch.set_num_threads(threads)
        self.worker = RolloutWorker.from_model_config(rollout_cfg, model_cfg.at_checkpoint(init_path), **token_ids)

    def generate(self, prompt_ids: list[list[int]], params: Any) -> Any:
        return self.worker.generate(prompt_ids, params)

    def update_weights(self, bucket_refs: list[Any], version: int) -> int:
        """Fetch the buckets one at a time from the object store (peak memory ~ one bucket)."""
        import ray

        return self.worker.update_weights((nt for ref in bucket_refs for nt in ray.get(ref)), version)

    def policy_version(self) -> int:
        return self.worker.policy_version

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(model, *args)` on the engine's model (tests: weight-sync equality)."""
        return fn(self.worker.engine.model, *args)


def shard_seed(seed: int, shard: int) -> int:
    """Each worker's sampling seed: requests are seeded by (seed, prompt index within the call),
    so shards need distinct seeds; a pure function keeps resumed runs identical."""
    return (seed * 1_000_003 + shard * 7_919 + 1) % (2**62)


class RolloutGroup:
    """`cluster.rollout_workers` Ray actors, each a RolloutHost; prompts are split into
    contiguous shards, one per worker, and the completions merged back in prompt order."""

    def __init__(self, cluster: ClusterConfig, rollout_cfg: Any, model_cfg: ModelConfig,
                 init_path: Optional[str], *, token_ids: dict[str, Any]):
        import ray

        n = cluster.rollout_workers
        threads = cluster.torch_threads
        self._cls = ray.remote(num_cpus=cluster.cpus_per_rollout_worker, max_restarts=0)(RolloutHost)
        self._args = (rollout_cfg, model_cfg, init_path)
        self._kwargs = dict(token_ids=token_ids, threads=threads)
        self.actors = [self._spawn() for _ in range(n)]
        ray.get([a.policy_version.remote() for a in self.actors])  # surface build errors here

    def _spawn(self) -> Any:
        return self._cls.remote(*self._args, **self._kwargs)

    def __len__(self) -> int:
        return len(self.actors)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any) -> Any:
        """All prompts x params.n completions as one RolloutBatch (prompt-major, global prompt
        indices). Raises RolloutWorkerLost after replacing workers that died."""
        import ray

        from posttrain.rollout import Completion, RolloutBatch, rollout_metrics

        per = -(-len(prompt_ids) // len(self.actors))
        shards = [(i, list(map(list, prompt_ids[i * per:(i + 1) * per]))) for i in range(len(self.actors))]
        shards = [(i, s) for i, s in shards if s]
        refs = [self.actors[i].generate.remote(s, replace(params, seed=None if params.seed is None
                                                          else shard_seed(params.seed, i)))
                for i, s in shards]
        try:
            batches = ray.get(refs)
        except ray.exceptions.RayActorError as e:
            raise RolloutWorkerLost(self.replace_dead(), type(e).__name__) from e
        versions = {b.policy_version for b in batches}
        if len(versions) != 1:
            raise RuntimeError(f"rollout workers hold different policy versions {sorted(versions)}")
        completions = []
        for (i, _), b in zip(shards, batches):
            completions += [Completion(c.prompt_index + i * per, c.sample_index, c.token_ids, c.logprobs,
                                       c.finish_reason) for c in b.completions]
        seconds = max(b.metrics.get("rollout/seconds", 0.0) for b in batches)  # shards run in parallel
        return RolloutBatch(completions, versions.pop(), len(prompt_ids), params.n,
                            rollout_metrics(completions, seconds))

    def replace_dead(self) -> list[int]:
        """Rebuild every actor that no longer answers; returns their indices."""
        import ray

        dead = []
        for i, a in enumerate(self.actors):
            try:
                ray.get(a.policy_version.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(i)
                self.actors[i] = self._spawn()
        return dead

    def update_weights(self, bucket_refs: list[Any], version: int,
                       workers: Optional[Sequence[int]] = None) -> list[int]:
        """Load the buckets into `workers` (default: all) as `version`. A worker that died
        (before or during the update) is rebuilt from the init checkpoint and given the same
        buckets, so every worker ends on `version` and nothing trained is lost. Returns the
        indices of the workers rebuilt."""
        import ray

        idx = list(range(len(self.actors)) if workers is None else workers)
        refs = {i: self.actors[i].update_weights.remote(bucket_refs, version) for i in idx}
        try:
            ray.get(list(refs.values()))
            return []
        except ray.exceptions.RayActorError:
            replaced = self.replace_dead()
            ray.get([refs[i] for i in idx if i not in replaced]
                    + [self.actors[i].update_weights.remote(bucket_refs, version) for i in replaced])
            return replaced

    def policy_versions(self) -> list[int]:
        import ray

        return ray.get([a.policy_version.remote() for a in self.actors])

    def call(self, index: int, fn: Callable[..., Any], *args: Any) -> Any:
        import ray

        return ray.get(self.actors[index].call.remote(fn, *args))

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
