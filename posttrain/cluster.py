"""Ray: start (or join) the cluster and host learners and rollout workers as actors.

This is the only module that wraps plain classes with `ray.remote`; everything else is
tested without Ray. `LearnerGroup` fans each call out to all DeepSpeed ranks and returns
rank 0's answer (metrics are already all-reduced by the learner).
"""
from __future__ import annotations

import os
import socket
from typing import Any, Optional

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
        threads = max(1, (os.cpu_count() or 1) // world)
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
