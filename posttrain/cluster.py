"""Ray: start (or join) the cluster and host learners and rollout workers as actors.

This is the only module that wraps plain classes with `ray.remote`; everything else is
tested without Ray. `LearnerGroup` fans each call out to all DeepSpeed ranks and returns
rank 0's answer (metrics are already all-reduced by the learner). `RolloutGroup` hosts
`cluster.rollout_workers` RolloutWorkers, shards prompts across them and replaces dead ones.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import Any, Optional, Sequence

from posttrain.config import ClusterConfig, ModelConfig


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

    def configure(self, *args: Any, **kwargs: Any) -> None:
        self._all("configure", *args, **kwargs)

    def train_step(self, objective: Any, per_rank_micro_batches: list[list[dict]], **knobs: Any) -> dict:
        import ray

        refs = [a.train_step.remote(objective, mb, **knobs)
                for a, mb in zip(self.actors, per_rank_micro_batches)]
        return ray.get(refs)[0]

    def evaluate(self, objective: Any, per_rank_micro_batches: list[list[dict]], **knobs: Any) -> dict:
        import ray

        refs = [a.evaluate.remote(objective, mb, **knobs)
                for a, mb in zip(self.actors, per_rank_micro_batches)]
        return ray.get(refs)[0]

    def call_rank0(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self.actors[0].call.remote(fn, *args, **kwargs))

    def call_rank0_async(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Like call_rank0 but returns the ObjectRef: the result stays in the object store
        (weight buckets go learner -> rollout workers without passing through the driver)."""
        return self.actors[0].call.remote(fn, *args, **kwargs)

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
        cfg = replace(model_cfg, path=init_path, preset=None) if init_path else model_cfg
        self.worker = RolloutWorker.from_model_config(rollout_cfg, cfg, **token_ids)

    def generate(self, prompt_ids: list[list[int]], params: Any) -> Any:
        return self.worker.generate(prompt_ids, params)

    def update_weights(self, bucket_refs: list[Any], version: int) -> int:
        """Fetch the buckets one at a time from the object store (peak memory ~ one bucket)."""
        import ray

        return self.worker.update_weights((nt for ref in bucket_refs for nt in ray.get(ref)), version)

    def policy_version(self) -> int:
        return self.worker.policy_version

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(model, ...)` on the engine's model (tests: weight-sync equality)."""
        return fn(self.worker.engine.model, *args, **kwargs)


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

        from posttrain.rollout import Completion, RolloutBatch
        from posttrain.rollout.worker import rollout_metrics

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
                       workers: Optional[Sequence[int]] = None) -> None:
        import ray

        idx = range(len(self.actors)) if workers is None else workers
        ray.get([self.actors[i].update_weights.remote(bucket_refs, version) for i in idx])

    def policy_versions(self) -> list[int]:
        import ray

        return ray.get([a.policy_version.remote() for a in self.actors])

    def call(self, index: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self.actors[index].call.remote(fn, *args, **kwargs))

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
