"""Ray: start (or join) the cluster and place learners and rollout workers on it as actors.

This is the only module that wraps plain classes with `ray.remote`; everything else is
tested without Ray. `Placement` reserves Ray's own resources for a run in one placement group:
with GPUs, one bundle of one GPU per learner rank, and the rollout workers either on the same
GPUs (`colocated`, fractional GPU shares) or on GPUs of their own (`split`); on CPU, CPU
bundles. Ray then sets each actor's CUDA_VISIBLE_DEVICES, and the actor binds the first GPU it
sees (posttrain.learner.bind_device). `LearnerGroup` fans each call out to all DeepSpeed ranks
and returns rank 0's answer (metrics are already all-reduced by the learner). `RolloutGroup`
hosts `cluster.rollout_workers` RolloutWorkers, shards prompts across them and replaces dead
ones. Multi-node is Ray's: with `cluster.address` the same placement spans the cluster's nodes,
and the ranks meet at the node of bundle 0.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Optional, Sequence

from posttrain.models import ModelConfig
from posttrain.objectives.common import Objective, StepCounts
from posttrain.rendezvous import forget_rendezvous, node_ip, rendezvous_key

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
    num_gpus: Optional[int] = None  # GPUs of the local Ray instance (null: what Ray detects)
    use_gpus: Optional[bool] = None  # one GPU per learner rank (and rollout GPUs); null: when the cluster has GPUs
    # colocated: rollout workers share the learners' GPUs (worker i on rank i's GPU); split:
    # learners on `learners` GPUs, rollout workers on `rollout_workers` GPUs of their own
    placement: Literal["colocated", "split"] = "colocated"
    # how new weights reach the rollout workers; auto: CUDA IPC when colocated on GPUs, a bucketed
    # NCCL broadcast when split on GPUs, the Ray object store on CPU
    weight_sync: Literal["auto", "object_store", "broadcast", "cuda_ipc"] = "auto"
    # torch intra-op threads in each learner and rollout process. 1 by default: learners and
    # workers share the machine, and oversubscribed OpenMP threads spin - a tiny-model SFT
    # step measured 0.27 s with 1 thread and 2.4 s with 2 on a busy 2-core machine.
    torch_threads: int = 1
    # keep the learner actors from one stage to the next when it starts from the weights they
    # hold (init from the stage just run here, no LoRA on either side, the same model
    # overrides): no new processes, CUDA contexts or compiled kernels per stage. Off until it is
    # measured on a GPU, where a stage hand-over took 40-60 s (docs/gpu.md, session 10)
    reuse_learners: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.address is None or self.address == "auto" or (
                bool(_ADDRESS.match(self.address)) and 1 <= int(self.address.rpartition(":")[2]) <= 65535), "address",
             f"expected null, 'auto', host:port or ray://host:port (port 1-65535), got {self.address!r}"),
            (self.num_cpus is None or self.num_cpus >= 1, "num_cpus", f"must be null or >= 1, got {self.num_cpus}"),
            (self.learners >= 1, "learners", f"must be >= 1, got {self.learners}"),
            (self.rollout_workers >= 1, "rollout_workers", f"must be >= 1, got {self.rollout_workers}"),
            (0 <= self.cpus_per_learner < float("inf"), "cpus_per_learner",
             f"must be a finite number >= 0, got {self.cpus_per_learner}"),
            (0 <= self.cpus_per_rollout_worker < float("inf"), "cpus_per_rollout_worker",
             f"must be a finite number >= 0, got {self.cpus_per_rollout_worker}"),
            (self.torch_threads >= 1, "torch_threads", f"must be >= 1, got {self.torch_threads}"),
            (self.num_gpus is None or self.num_gpus >= 0, "num_gpus", f"must be null or >= 0, got {self.num_gpus}"),
            (self.num_gpus is None or self.address is None, "num_gpus",
             "sets the GPUs of a local Ray instance; a cluster at `address` has its own"),
            (self.use_gpus is not False or self.weight_sync != "cuda_ipc", "weight_sync",
             "cuda_ipc needs use_gpus (colocated GPU workers)"),
            (self.weight_sync != "cuda_ipc" or self.placement == "colocated", "weight_sync",
             "cuda_ipc hands GPU memory to a worker on the same GPU: it needs placement colocated"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")


def start_ray(cluster: ClusterConfig) -> None:
    """Join `cluster.address`, or start a new local instance (docs/cluster.md, trust boundary):
    address "local", so never another instance found on the machine (RAY_ADDRESS, the newest
    `ray start` cluster); no dashboard; Ray's token authentication left as Ray sets it for a
    new cluster (on in the pinned Ray 2.60 unless RAY_AUTH_MODE=disabled)."""
    import ray

    if ray.is_initialized():
        return
    if cluster.address:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True)
    else:
        # address "local": always a new instance of our own, never one a `ray start` left on this machine
        ray.init(address="local", num_cpus=cluster.num_cpus or os.cpu_count(), num_gpus=cluster.num_gpus,
                 include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    stop_on_sigterm()


# Which signal stopped the run, for the CLI's closing line: Ray's `get` re-raises an interrupt as a
# plain KeyboardInterrupt, so the exception cannot carry it.
STOPPED_BY: list[str] = []
# What the watchdog does before it exits, when a stop after SIGTERM does not settle in time: the
# CLI prints its closing line here (and empties the list once it has printed it itself).
ON_STUCK_STOP: list[Callable[[str], None]] = []
DEFAULT_STOP_GRACE_S = 20.0


def stop_grace_s() -> float:
    """Seconds a stop may take before the watchdog ends the process: POSTTRAIN_STOP_GRACE_S, or
    20 when unset or not a number in [0, 1e6). Keep it under a scheduler's own kill delay
    (`timeout -k 30`)."""
    try:
        grace = float(os.environ.get("POSTTRAIN_STOP_GRACE_S", DEFAULT_STOP_GRACE_S))
    except ValueError:
        return DEFAULT_STOP_GRACE_S
    return grace if 0 <= grace < 1e6 else DEFAULT_STOP_GRACE_S


class _StopWatchdog:
    """Ends a process whose stop after SIGTERM does not settle: a daemon thread, started when
    the handler is installed (never from inside the handler), that waits for a stop request;
    then, unless `settle()` comes within stop_grace_s(), it runs ON_STUCK_STOP, kills this
    process's descendants (what is left of the local Ray instance) and exits 143."""

    def __init__(self) -> None:
        import threading

        self.requested = threading.Event()
        self.settled = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def arm(self) -> None:
        import threading

        if self.thread is not None and self.thread.is_alive() and not self.requested.is_set():
            return  # already waiting
        self.requested, self.settled = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(self.requested, self.settled),
                                       name="posttrain-stop", daemon=True)
        self.thread.start()

    @staticmethod
    def _watch(requested: Any, settled: Any) -> None:
        import sys

        requested.wait()
        if settled.wait(stop_grace_s()):
            return
        for hook in list(ON_STUCK_STOP):
            try:
                hook(STOPPED_BY[0] if STOPPED_BY else "SIGTERM")
            except BaseException:  # noqa: BLE001 - rich raises SystemExit on a broken pipe; exit anyway
                pass
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                try:
                    child.kill()
                except psutil.Error:
                    pass
        except Exception:  # noqa: BLE001 - no psutil, or the process table changed under us
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(143)


_WATCHDOG = _StopWatchdog()


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job, `timeout`, `kill`) stops the run the way Ctrl-C
    does: KeyboardInterrupt in the driver's main thread, so every stage's `finally` shuts its
    actors down and the metrics log is closed; `posttrain run` then prints one line and exits 143,
    and `--resume` continues from the last saved state. Installed after ray.init: Ray's core
    otherwise answers SIGTERM by dumping every thread's stack. Main thread only (Python's rule).

    A signal to the whole process group (`timeout`, Slurm's scancel) also reaches the raylet
    this driver started, which dies of it; the shutdown then waits on Ray forever (measured: a
    `timeout`-cut run ended only by SIGKILL). So the signal also wakes a watchdog
    (`_StopWatchdog`): a stop that has not settled (`settle_stop`: Ray shut down after the
    stages' cleanup) within stop_grace_s() ends the process with exit 143. Saved steps are
    written atomically, so nothing saved is lost."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _WATCHDOG.arm()

    def stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        STOPPED_BY.append(name)
        _WATCHDOG.requested.set()
        raise KeyboardInterrupt(name)

    signal.signal(signal.SIGTERM, stop)


def settle_stop() -> None:
    """After a SIGTERM, once the stages' cleanup is done: shut Ray down here (not at interpreter
    exit, where a dead raylet would hang it unwatched) and disarm the watchdog. No-op otherwise."""
    if _WATCHDOG.requested.is_set():
        stop_ray()
        _WATCHDOG.settled.set()


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# GPU shares within one bundle (one GPU): colocated, a learner rank, its rollout worker and a
# frozen reference policy (KL) share the GPU; split, the reference shares the learner's GPU.
_SHARES = {("colocated", "learner"): 0.5, ("colocated", "rollout"): 0.25, ("colocated", "reference"): 0.25,
           ("split", "learner"): 0.75, ("split", "rollout"): 1.0, ("split", "reference"): 0.25}


class Placement:
    """The run's reservation of Ray resources: one placement group whose bundles hold the
    learner ranks (bundle r: rank r) and, when split, the rollout workers (bundles after them).
    Never all ranks on one GPU, never a requested GPU idle: each learner rank and each split
    rollout worker gets a bundle of exactly one GPU. Create once per run; `remove()` at the end."""

    def __init__(self, cluster: ClusterConfig, *, timeout_s: float = 300.0):
        import ray
        from ray.util.placement_group import placement_group

        self.cluster = cluster
        have = ray.cluster_resources().get("GPU", 0)
        self.gpus = cluster.use_gpus if cluster.use_gpus is not None else have >= 1
        self.mode = cluster.placement
        L, R = cluster.learners, cluster.rollout_workers
        if self.gpus and self.mode == "colocated" and R > L:
            raise ValueError(f"cluster.placement colocated puts rollout worker i on learner rank i's GPU: "
                             f"cluster.rollout_workers ({R}) must be <= cluster.learners ({L}), or use split")
        need = (L if self.mode == "colocated" else L + R) if self.gpus else 0
        if need > have:
            raise ValueError(f"cluster: the recipe needs {need} GPUs ({self.mode}: {L} learners, {R} rollout "
                             f"workers), the Ray cluster has {have:g}")
        learner = {"GPU": 1.0, "CPU": cluster.cpus_per_learner + (cluster.cpus_per_rollout_worker
                                                                  if self.mode == "colocated" else 0.0)}
        rollout = {"GPU": 1.0, "CPU": cluster.cpus_per_rollout_worker}
        if not self.gpus:  # CPU: learners get CPU bundles (so ranks can meet at bundle 0's node)
            learner, rollout = {"CPU": cluster.cpus_per_learner}, {"CPU": cluster.cpus_per_rollout_worker}
        bundles = [learner] * L + ([rollout] * R if self.mode == "split" or not self.gpus else [])
        bundles = [{k: v for k, v in b.items() if v > 0} for b in bundles]
        self.rollout_bundles = self.gpus and self.mode == "split" or (not self.gpus and rollout.get("CPU", 0) > 0)
        if not all(bundles[:L]):  # zero-resource learners (CPU, cpus_per_learner 0): nothing to place
            self.group = None
            return
        if not self.rollout_bundles:
            bundles = bundles[:L]
        self.group = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(f"cluster: Ray could not reserve {bundles} within {timeout_s:.0f} s "
                               f"(cluster resources: {ray.cluster_resources()})")

    def _strategy(self, bundle: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle)}

    def learner(self, rank: int, role: str = "learner") -> dict[str, Any]:
        """Ray actor options of learner rank `rank` (role "reference": a frozen policy's rank)."""
        c = self.cluster
        if not self.gpus:
            opts: dict[str, Any] = {"num_cpus": c.cpus_per_learner if role == "learner" else 0}
            return {**opts, **(self._strategy(rank) if self.group is not None and role == "learner" else {})}
        cpus = c.cpus_per_learner if role == "learner" else 0.0
        return {"num_cpus": cpus, "num_gpus": _SHARES[(self.mode, role)], **self._strategy(rank)}

    def rollout(self, index: int) -> dict[str, Any]:
        """Ray actor options of rollout worker `index`."""
        c = self.cluster
        if not self.gpus:
            opts = {"num_cpus": c.cpus_per_rollout_worker}
            return {**opts, **(self._strategy(c.learners + index) if self.rollout_bundles and self.group else {})}
        bundle = index if self.mode == "colocated" else c.learners + index
        cpus = 0.0 if self.mode == "colocated" else c.cpus_per_rollout_worker  # colocated: in the learner's bundle
        return {"num_cpus": cpus, "num_gpus": _SHARES[(self.mode, "rollout")], **self._strategy(bundle)}

    def master(self) -> str:
        """The IP of the node of learner rank 0's bundle: where the ranks meet."""
        import ray

        if self.group is None:
            return "127.0.0.1"
        task = ray.remote(num_cpus=0)(node_ip).options(**self._strategy(0))
        return ray.get(task.remote())

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def death_cause(error: BaseException, limit: int = 300) -> str:
    """One line on why a Ray actor died: the exception its constructor raised, or Ray's exit
    detail for a process that ended (killed, out of memory, a crash)."""
    text = getattr(error, "error_msg", None) or str(error)
    if getattr(error, "_actor_init_failed", False):  # the traceback of the creation task: its last line
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        cause = f"its constructor raised {lines[-1]}" if lines else "its constructor raised"
    else:
        m = re.search(r"Worker exit type: (\S+) Worker exit detail: ([^.]*\.)", text)
        cause = f"{m.group(1)}: {m.group(2)}" if m else " ".join(text.split())
    return cause if len(cause) <= limit else cause[:limit - 3] + "..."


class LearnerLost(RuntimeError):
    """A learner rank died: the stage stops (its ranks cannot go on without it: they wait in the
    collectives) and the run resumes from the last complete state with --resume."""


class LearnerGroup:
    """`cluster.learners` DeepSpeed ranks, each a Ray actor holding a `Learner`, placed by
    `placement` (default: a placement of its own, removed at shutdown). role "reference": a
    frozen policy sharing the learners' GPUs (one rank).

    Under ZeRO-3 (`learner.zero_stage: 3`) a call on "rank 0" is made on every rank (the others
    `follow`: they run the same function and answer nothing), because every forward and whole-
    weight read gathers parameters collectively; calls are queued on each actor in the order
    the driver makes them, so the ranks' gathers line up."""

    def __init__(self, cluster: ClusterConfig, model_cfg: ModelConfig, init_path: Optional[str],
                 *, token_ids: dict[str, Any], seed: int, placement: Optional[Placement] = None,
                 role: str = "learner"):
        import ray

        from posttrain.learner import DistInfo, Learner

        world = cluster.learners
        self._own_placement = placement is None
        self.placement = placement or Placement(cluster)
        addr = self.placement.master() if role == "learner" else "127.0.0.1"
        self._rendezvous = rendezvous_key(f"learners-{role}")
        threads = cluster.torch_threads
        self.actors = [
            ray.remote(Learner).options(**self.placement.learner(rank, role)).remote(
                model_cfg, init_path, token_ids=token_ids, seed=seed,
                dist=DistInfo(rank, world, addr, rendezvous=self._rendezvous), threads=threads)
            for rank in range(world)
        ]
        self.world_size = world
        self.gathers = False  # ZeRO-3 since the last configure: model calls run on every rank
        self._followers: list[Any] = []  # refs of follower calls not yet checked

    def placements(self) -> list[dict[str, Any]]:
        """Each rank's Ray GPU ids, visible devices and bound device (rank order)."""
        return self._all("placement")

    def _get(self, refs: list[Any]) -> list[Any]:
        """ray.get of the ranks' answers; a dead rank is LearnerLost at once (the live ranks
        would wait for it in a collective forever, so answers are checked as they come)."""
        import ray

        extra, self._followers = self._followers, []
        pending = list(refs) + extra
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                who = (f"rank {refs.index(ready[0])}" if ready[0] in refs and len(refs) == len(self.actors)
                       else "rank 0" if ready[0] in refs else "a rank")
                raise LearnerLost(f"learner {who} died ({type(e).__name__}: {death_cause(e)}); the stage stopped. "
                                  f"Its last complete state is kept: run again with --resume to continue from it") from None
        return ray.get(list(refs))

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(a, method).remote(*args) for a in self.actors])

    def configure(self, optim: Any, schedule: Any, learner: Any, total_steps: int, lora: Any = None,
                  adapter: Optional[str] = None, profile_dir: Optional[str] = None) -> None:
        self._all("configure", optim, schedule, learner, total_steps, lora, adapter, profile_dir)
        self.gathers = learner.zero_stage == 3

    def train_step(self, objective: Objective, per_rank: list[list[Any]], counts: StepCounts) -> dict[str, Any]:
        from posttrain.learner import join_rank_answers

        return join_rank_answers(self._get([a.train_step.remote(objective, mb, counts)
                                            for a, mb in zip(self.actors, per_rank)]))

    def evaluate(self, objective: Objective, per_rank: list[list[Any]], counts: StepCounts) -> dict[str, Any]:
        from posttrain.learner import join_rank_answers

        return join_rank_answers(self._get([a.evaluate.remote(objective, mb, counts)
                                            for a, mb in zip(self.actors, per_rank)]))

    def call_rank0(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(rank 0's model, *args) on the learner: generation, old / reference log-probs
        (under ZeRO-3 every rank runs it; rank 0 answers)."""
        return self._get([self.call_rank0_async(fn, *args)])[0]

    def call_rank0_async(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Like call_rank0 but returns the ObjectRef: the result stays in the object store
        (weight buckets go learner -> rollout workers without passing through the driver)."""
        ref = self.actors[0].call.remote(fn, *args)
        if self.gathers:
            self._followers += [a.follow.remote(fn, *args) for a in self.actors[1:]]
        return ref

    def call_rank0_alone_async(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn on rank 0 only, also under ZeRO-3: for calls that read no parameters (joining a
        process group as its rank 0)."""
        return self.actors[0].call.remote(fn, *args)

    def call_rank_async(self, rank: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(rank `rank`'s model, *args) as an ObjectRef (CUDA IPC handles of a colocated rank).
        Under ZeRO-3 the caller makes the same call on every rank before waiting on any."""
        return self.actors[rank].call.remote(fn, *args)

    def state_dict(self) -> dict:
        """Rank 0's full weights (under ZeRO-3 every rank gathers them with it)."""
        import ray

        if self.gathers:
            return self._all("state_dict")[0]
        return ray.get(self.actors[0].state_dict.remote())

    def close_profile(self) -> None:
        """Every rank writes learner.profile's report if its window is still open (stage end)."""
        self._all("close_profile")

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
        forget_rendezvous(self._rendezvous)
        if self._own_placement:
            self.placement.remove()


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
                 token_ids: dict[str, Any], threads: int, release_memory: bool = False):
        """release_memory: hand the engine's freed GPU memory (decode caches, prefill
        activations) back to the driver after each generation, so a learner sharing the GPU
        (colocated) can use it while it trains; the weights stay."""
        import torch

        from posttrain.rollout import RolloutWorker

        torch.set_num_threads(threads)
        from posttrain.learner import bind_device

        # the GPU Ray assigned this worker (the first visible one), or the CPU
        self.release_memory = release_memory
        self.worker = RolloutWorker.from_model_config(rollout_cfg, model_cfg.at_checkpoint(init_path),
                                                      device=bind_device(), **token_ids)

    def generate(self, prompt_ids: list[list[int]], params: Any) -> Any:
        import torch

        out = self.worker.generate(prompt_ids, params)
        if self.release_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    def update_weights(self, bucket_refs: list[Any], version: int) -> int:
        """Fetch the buckets one at a time from the object store (peak memory ~ one bucket)."""
        import ray

        return self.worker.update_weights((nt for ref in bucket_refs for nt in ray.get(ref)), version)

    def load_with(self, source: Callable[..., Any], version: int, *args: Any) -> int:
        """Load the named tensors `source(model, *args)` yields (a broadcast received, CUDA IPC
        buffers mapped: posttrain.weight_sync), then advance to `version`."""
        return self.worker.update_weights(source(self.worker.engine.model, *args), version)

    def policy_version(self) -> int:
        return self.worker.policy_version

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(model, *args)` on the engine's model (tests: weight-sync equality)."""
        return fn(self.worker.engine.model, *args)

    def placement(self) -> dict[str, Any]:
        """Where this worker runs: Ray's GPU ids, visible devices, the engine model's device."""
        from posttrain.learner import placement_info

        return placement_info(next(self.worker.engine.model.parameters()).device)


def shard_seed(seed: int, shard: int) -> int:
    """Each worker's sampling seed: requests are seeded by (seed, prompt index within the call),
    so shards need distinct seeds; a pure function keeps resumed runs identical."""
    return (seed * 1_000_003 + shard * 7_919 + 1) % (2**62)


class RolloutGroup:
    """`cluster.rollout_workers` Ray actors, each a RolloutHost; prompts are split into
    contiguous shards, one per worker, and the completions merged back in prompt order."""

    def __init__(self, cluster: ClusterConfig, rollout_cfg: Any, model_cfg: ModelConfig,
                 init_path: Optional[str], *, token_ids: dict[str, Any], placement: Optional[Placement] = None):
        import ray

        n = cluster.rollout_workers
        threads = cluster.torch_threads
        self.placement = placement  # None: unplaced CPU workers (tests that build the group alone)
        self._cpus = cluster.cpus_per_rollout_worker
        self._cls = ray.remote(max_restarts=0)(RolloutHost)
        self._args = (rollout_cfg, model_cfg, init_path)
        # colocated on GPUs: the learner trains on the same GPU between generations
        release = placement is not None and placement.gpus and placement.mode == "colocated"
        self._kwargs = dict(token_ids=token_ids, threads=threads, release_memory=release)
        self.actors = [self._spawn(i) for i in range(n)]
        ray.get([a.policy_version.remote() for a in self.actors])  # surface build errors here

    def _spawn(self, index: int) -> Any:
        opts = self.placement.rollout(index) if self.placement is not None else {"num_cpus": self._cpus}
        return self._cls.options(**opts).remote(*self._args, **self._kwargs)

    def placements(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.placement.remote() for a in self.actors])

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
                self.actors[i] = self._spawn(i)
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
