"""What every stage shares: the common part of its config, and steps as functions.

`StageConfig` declares the fields every stage kind has (name, data, steps, optim, schedule,
eval, checkpoint, learner, lora, init_from, log_every, model_overrides) once; each kind's config in
posttrain/stages/<kind>.py adds its own. Each stage loop reads top to bottom and calls the
functions below for the parts every stage has: preparing data, ordering batches, sharding them
over learner ranks into micro-batches, saving resumable state and finishing with a checkpoint
+ manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from rich.console import Console

from posttrain.checkpoint import CheckpointConfig, atomic_dir, clean_temp, write_json_atomic
from posttrain.cluster import ClusterConfig, Placement
from posttrain.data import DataConfig
from posttrain.evals import EXTRA_GAINS, EvalConfig
from posttrain.faults import kill_point
from posttrain.learner import Learners, LearnerConfig, OptimConfig, ScheduleConfig
from posttrain.lora import LoRAConfig, parameter_counts
from posttrain.metrics import MetricsLogger, plot_stage
from posttrain.models import ModelConfig

T = TypeVar("T")
B = TypeVar("B")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """The fields every stage kind has; a kind's config (SFTStageConfig, DPOStageConfig,
    RLStageConfig) adds its `kind` and its own sections."""

    name: str  # unique in the recipe; overrides address the stage by it (stages.<name>.steps=...)
    kind: str  # the stage kind: a key of posttrain.stages.STAGES (each kind's class narrows it)
    data: DataConfig
    steps: int  # optimizer steps (rl: rollout batches)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: Optional[LoRAConfig] = None  # train LoRA adapters (peft) instead of all weights; null: full fine-tuning
    init_from: Optional[str] = None  # an earlier stage's name; default: the previous stage
    log_every: int = 1  # optimizer steps between train-metric rows (the last step is always logged)
    # model config keys set when this stage's learners load their starting checkpoint, on top
    # of model.overrides (long context: {rope_parameters: {rope_type: default, rope_theta: 1.0e7}})
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if self.data.task is None and self.data.train is None:
            raise ValueError("data: set data.train (a file) or data.task (a synthetic task)")
        if not self.steps >= 1:
            raise ValueError(f"steps: must be positive, got {self.steps}")
        if not self.log_every >= 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")
        if self.learner.profile is not None and self.learner.profile[1] > self.optimizer_steps:
            raise ValueError(f"learner.profile: the window {list(self.learner.profile)} ends after the stage's "
                             f"{self.optimizer_steps} optimizer steps")

    @property
    def optimizer_steps(self) -> int:
        """The learners' optimizer steps in this stage (rl: `steps` rollout batches x updates_per_batch)."""
        return self.steps

    def check_cluster(self, cluster: ClusterConfig) -> None:
        """Checks that need the cluster (a kind with a batch overrides this)."""

    def check_files(self) -> None:
        """Read every row of the stage's local data files (streamed) once the stage's own checks
        passed; ValueError("data.<field>: <file>:<row>: <problem>"). A kind that reads more
        files extends this."""
        try:
            self.data.check_rows()
        except ValueError as e:
            raise ValueError(f"data.{e}") from None


@dataclass(frozen=True)
class BatchConfig:
    """Sequences per optimizer step (across all learners) and per micro-batch.

    With `data.pack` in an sft stage the unit is a packed row of up to data.max_seq_len tokens
    instead of a sequence: global_size rows per step (<= global_size x max_seq_len tokens) and
    micro_size must be 1 (one packed row per micro-batch bounds the activation memory). In a
    dpo stage both count pairs; a micro-batch's pairs are packed into rows, one forward each."""

    global_size: int = 32  # per optimizer step, all learners together
    micro_size: int = 8  # per forward/backward on one learner

    def __post_init__(self) -> None:
        if not self.micro_size >= 1:
            raise ValueError(f"micro_size: must be >= 1, got {self.micro_size}")
        if not (self.global_size >= 1 and self.global_size % self.micro_size == 0):
            raise ValueError(f"global_size: {self.global_size} must be a positive multiple of micro_size "
                             f"{self.micro_size}")

    def check_learners(self, learners: int) -> None:
        """Every learner gets the same whole number of micro-batches per step."""
        if self.global_size % (self.micro_size * learners):
            raise ValueError(f"batch.global_size: {self.global_size} must be a multiple of batch.micro_size x "
                             f"cluster.learners = {self.micro_size} x {learners} = {self.micro_size * learners}")


@dataclass
class StageContext:
    """What a stage loop gets from the pipeline (besides its own typed config)."""

    model: ModelConfig  # the recipe's model (how the stage's checkpoints load)
    cluster: ClusterConfig  # where rollout workers and extra learner groups go
    run_seed: int  # the recipe's seed (task files, model init)
    run_dir: Path
    stage_dir: Path
    tokenizer: Any  # PreTrainedTokenizerFast
    tokenizer_dir: Path
    init_path: Optional[str]  # HF checkpoint the stage starts from (None: fresh preset)
    logger: MetricsLogger
    console: Console
    seed: int
    placement: Optional[Placement] = None  # the run's reservation of Ray resources (None: unplaced)
    step_clock: float = field(default_factory=time.perf_counter)  # end of the previous step's bookkeeping
    init_adapter: Optional[str] = None  # lora.continue_adapter: the PEFT adapter dir to keep training on init_path
    # when the pipeline began the stage, before its learners start (the stage's wall time; after
    # --resume, of the resumed part)
    started: float = field(default_factory=time.perf_counter)

    @property
    def final_dir(self) -> Path:
        return self.stage_dir / "final"

    @property
    def state_root(self) -> Path:
        return self.stage_dir / "state"

    @property
    def profile_dir(self) -> Path:  # learner.profile's reports
        return self.stage_dir / "profile"


# ------------------------------------------------------------------------------ data
def task_files(ctx: StageContext, data: DataConfig) -> dict[str, Path]:
    """Write the stage's synthetic task (once per run and arguments) and return its files."""
    from posttrain.data import write_task

    assert data.task is not None
    # Stages sharing a task and its arguments share its files (e.g. SFT and RL eval sets);
    # different arguments get their own folder.
    key = hashlib.sha1(json.dumps(data.task_args, sort_keys=True).encode()).hexdigest()[:8]
    out = ctx.run_dir / "data" / (data.task if not data.task_args else f"{data.task}-{key}")
    files = write_task(data.task, out, seed=ctx.run_seed, **data.task_args)
    return {k: Path(v) for k, v in files.items()}


def also_evals(ctx: StageContext, learners: Learners, cfg: EvalConfig, *, stage: str, step: int) -> dict[str, Any]:
    """eval.also: each other task's held-out accuracy with the stage's current weights,
    {"also": {task: {"accuracy", "n"[, "needle"][, "gain"]}}}; {} when eval.also is empty. The rows are
    the task's rl_eval file (prompt + answer), else its sft_eval file."""
    from posttrain.data import load_records
    from posttrain.evals import held_out_eval

    out: dict[str, Any] = {}
    for a in cfg.also:
        files = task_files(ctx, DataConfig(task=a.task, task_args=a.task_args))
        fmt = "rl" if "rl_eval" in files else "prompt_completion"
        records = load_records(files["rl_eval" if fmt == "rl" else "sft_eval"], fmt).records
        sub = dataclasses.replace(cfg, limit=a.limit, max_new_tokens=a.max_new_tokens or cfg.max_new_tokens, also=[],
                                  sampled=None)  # the other task greedy only
        out[a.task] = held_out_eval(ctx, learners, records, a.task, sub, stage=f"{stage}-also-{a.task}", step=step)
    return {"also": out} if out else {}


def resolve_data_paths(ctx: StageContext, data: DataConfig, role: str) -> tuple[Path, Optional[Path]]:
    """(train, eval) files: explicit paths win; else the task's files for `role` (e.g. "sft")."""
    files = task_files(ctx, data) if data.task else {}
    train = Path(data.train) if data.train else files[f"{role}_train"]
    evalp = Path(data.eval) if data.eval else files.get(f"{role}_eval")
    return train, evalp


def load_split(path: Optional[Path], data: DataConfig, console: Console) -> list[Any]:
    from posttrain.data import load_records

    if path is None:
        return []
    res = load_records(path, data.format, on_bad_row=data.on_bad_row)
    if res.n_skipped:
        console.print(f"[yellow]{path}: skipped {res.n_skipped} malformed rows[/yellow]")
    return list(res.records)


def batch_indices(n: int, global_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of per-epoch shuffles.

    A pure function of (n, global_size, step, seed): a resumed run sees exactly the batches
    an uninterrupted run would have seen.
    """
    if n == 0:
        raise ValueError("no training examples")
    out: list[int] = []
    start = step * global_size
    while len(out) < global_size:
        epoch, offset = divmod(start + len(out), n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.extend(perm[offset: offset + global_size - len(out)])
    return out


def shard(items: Sequence[T], world_size: int, micro_size: int) -> list[list[list[T]]]:
    """Split a global batch into `world_size` ranks x micro-batches of `micro_size` items."""
    per_rank = len(items) // world_size
    if per_rank * world_size != len(items):
        raise ValueError(f"global batch of {len(items)} does not split over {world_size} learners")
    ranks = [items[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]
    return [[list(r[i:i + micro_size]) for i in range(0, len(r), micro_size)] for r in ranks]


def micro_batches(items: Sequence[T], world_size: int, micro_size: int, build: Callable[[list[T]], B]
                  ) -> list[list[B]]:
    """ranks x micro-batches, each micro-batch's items turned into a batch by `build` (collate,
    pack, ...): what LearnerGroup.train_step / evaluate take."""
    return [[build(mb) for mb in rank] for rank in shard(items, world_size, micro_size)]


# Written last into a resumable state: every other file with its size. A state dir is complete
# when this file lists it whole (a temp dir, a lost or truncated file: not complete).
FILES = "files.json"


def _list_files(state: Path) -> dict[str, int]:
    return {str(f.relative_to(state)): f.stat().st_size for f in sorted(state.rglob("*"))
            if f.is_file() and f.name != FILES}


def is_complete_state(state: Path) -> bool:
    """Every file that FILES lists is there with its size (and progress.json among them)."""
    try:
        listed = json.loads((state / FILES).read_text())
        return "progress.json" in listed and all(
            (state / name).is_file() and (state / name).stat().st_size == size for name, size in listed.items())
    except (OSError, ValueError):
        return False


def latest_state(ctx: StageContext) -> Optional[Path]:
    """The newest complete resumable state of this stage: temp dirs are deleted, and a step dir
    that is not complete (is_complete_state) is never chosen."""
    clean_temp(ctx.state_root)
    if not ctx.state_root.is_dir():
        return None
    done = sorted(p for p in ctx.state_root.glob("step-*") if is_complete_state(p))
    return done[-1] if done else None


def resume_step(ctx: StageContext, learners: Learners, name: str) -> int:
    """Load the stage's newest resumable state into the (configured) learners, if any, and
    drop metrics rows logged after it. Returns the number of optimizer steps already done."""
    start = 0
    state = latest_state(ctx)
    if state is not None:
        start = learners.load_state(str(state))["step"]
        ctx.console.print(f"[cyan]{name}: resuming from step {start} ({state})[/cyan]")
    ctx.logger.truncate(name, start + 1)
    ctx.step_clock = time.perf_counter()
    return start


def check_finite(ctx: StageContext, stage: str, step: int, metrics: dict[str, Any]) -> None:
    """Stop a stage whose optimizer step `step` (1-based) had a non-finite loss or gradient norm,
    its metrics logged first. DeepSpeed has applied that step (fp32, and bf16 under ZeRO-1/2,
    whose per-gradient overflow scan is off: learner.deepspeed_config) or skipped it (fp16, bf16
    under ZeRO-0/3); either way the run stops before the weights are used (a weight sync, a
    save). The newest state under <stage>/state/ is intact (--resume)."""
    loss, norm = metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        ctx.logger.log(stage, "train", step, {k: v for k, v in metrics.items() if not isinstance(v, list)})
        raise RuntimeError(f"{stage}: step {step}: non-finite loss {loss} / grad norm {norm}; resume from the "
                           f"last checkpoint (checkpoint.every)")


def end_of_step(ctx: StageContext, cfg: StageConfig, learners: Learners, done: int, metrics: dict[str, Any],
                evaluate: Callable[[int], Any]) -> None:
    """After optimizer step `done` (1-based) of a stage: log its metrics, then the periodic
    eval and resumable state (the final ones are written by the stage's end). `time/step` is the
    step's wall time, evals and checkpoints excluded (the stage's throughput is computed from it)."""
    kill_point("step", cfg.name, done)
    metrics = {**metrics, "time/step": time.perf_counter() - ctx.step_clock}
    if done % cfg.log_every == 0 or done == cfg.steps:
        ctx.logger.log(cfg.name, "train", done, metrics)
    if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
        evaluate(done)
    if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
        save_state(ctx, learners, done, cfg.checkpoint)
    ctx.step_clock = time.perf_counter()


def throughput(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A stage's training throughput from its logged train rows: trained tokens per second of
    step wall time (rl: the whole step, generation included; also sampled and sampled + trained
    tokens per second), and the learners' peak GPU memory."""
    secs = sum(r.get("time/step", 0.0) for r in rows)
    out = {"steps_logged": float(len(rows)), "seconds": secs}
    tokens = sum(r.get("tokens", 0.0) for r in rows)
    if secs > 0 and tokens > 0:
        out["tokens_per_s"] = tokens / secs
    sampled = sum(r.get("sampled_tokens", 0.0) for r in rows)
    if secs > 0 and sampled > 0:
        out["sampled_tokens_per_s"] = sampled / secs
        out["sampled_trained_tokens_per_s"] = (sampled + tokens) / secs
    peaks = [r["gpu_peak_gib"] for r in rows if "gpu_peak_gib" in r]
    if peaks:
        out["gpu_peak_gib"] = max(peaks)
    return out


def save_state(ctx: StageContext, learners: Learners, step: int, cfg: CheckpointConfig,
               extra: Optional[dict[str, Any]] = None) -> Path:
    """Atomically write resumable state after `step` optimizer steps; prune old ones."""
    target = ctx.state_root / f"step-{step:06d}"
    with atomic_dir(target) as tmp:
        learners.save_state(str(tmp), {"step": step, **(extra or {})})
        write_json_atomic(tmp / FILES, _list_files(tmp))
        kill_point("checkpoint", ctx.stage_dir.name.split("-", 1)[1], step)
    for old in sorted(ctx.state_root.glob("step-*"))[: -max(1, cfg.keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def gain_line(gain: dict[str, Any], what: str = "accuracy", moved: tuple[str, str] = ("rows right now", "wrong now")
              ) -> str:
    """posttrain.evals.paired_gain in words: 'accuracy START -> END (+CHANGE, paired SE SE, z Z;
    I rows right now, R wrong now, of N)'; `what` names the score, `moved` the rows that went up
    and down."""
    se, z = gain["se"], gain["z"]
    noise = f"paired SE {se:.3f}, z {z:.1f}" if z is not None else "no paired noise: z undefined"
    return (f"{what} {gain['start']:.3f} -> {gain['end']:.3f} ({gain['delta']:+.3f}, {noise}; "
            f"{gain['improved']} {moved[0]}, {gain['regressed']} {moved[1]}, of {gain['n']})")


def finish_stage(ctx: StageContext, learners: Learners, stage_cfg: StageConfig,
                 eval_metrics: dict[str, Any], train_metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the HF checkpoint (+ tokenizer), plots and the manifest the next stage reads.

    A LoRA stage's checkpoint holds the merged weights, its adapter (PEFT format) is in
    final/adapter; the manifest's `lora` names the adapter and the base it sits on (init_path;
    null: the preset built from the run seed), which a continue_adapter stage starts from."""
    if stage_cfg.learner.profile is not None:  # a window the stage's updates did not reach the end of
        learners.close_profile()
    with atomic_dir(ctx.final_dir) as tmp:
        learners.save_pretrained(str(tmp))
        ctx.tokenizer.save_pretrained(str(tmp))
    plots = plot_stage(ctx.logger, stage_cfg.name, ctx.run_dir / "plots")
    params = learners.call_rank0(parameter_counts)
    ctx.console.print(f"{stage_cfg.name}: trained {params['trainable']:,.0f} of {params['total']:,.0f} parameters "
                      f"({params['trainable_share']:.2%})")
    speed = throughput([r for r in ctx.logger.rows(stage_cfg.name) if r["split"] == "train"])
    # the stage's whole wall time: its learners' and workers' start, evals and checkpoints too
    # (on a GPU the part outside the steps was 17-48 s per stage: docs/gpu.md, session 11)
    speed["stage_seconds"] = time.perf_counter() - ctx.started
    ctx.console.print(f"{stage_cfg.name}: {speed['seconds']:.1f} s in training steps of {speed['stage_seconds']:.1f} s "
                      f"in the stage (start, evals, checkpoints)", highlight=False)
    if eval_metrics.get("gain"):
        ctx.console.print(f"{stage_cfg.name}: held-out {gain_line(eval_metrics['gain'])}", highlight=False)
    for key, (_, what, moved) in EXTRA_GAINS.items():
        if eval_metrics.get(key):
            ctx.console.print(f"{stage_cfg.name}: held-out {gain_line(eval_metrics[key], what, moved)}", highlight=False)
    manifest = {
        "name": stage_cfg.name, "kind": stage_cfg.kind, "checkpoint": str(ctx.final_dir),
        "tokenizer": str(ctx.tokenizer_dir), "init_from": ctx.init_path,
        "config": dataclasses.asdict(stage_cfg), "eval": eval_metrics, "train": train_metrics,
        "throughput": speed,
        "plots": [str(p) for p in plots], "params": params,
        "lora": None if stage_cfg.lora is None else {"adapter": str(ctx.final_dir / "adapter"), "base": ctx.init_path},
    }
    write_json_atomic(ctx.stage_dir / "manifest.json", manifest)
    shutil.rmtree(ctx.state_root, ignore_errors=True)  # the final checkpoint supersedes it
    return manifest
