"""Steps shared by the stage loops, as functions (no base classes).

Each stage loop (posttrain/stages/<kind>.py) reads top to bottom and calls these for the
parts every stage has: preparing data, ordering batches, sharding them over learner ranks,
evaluating exact-match, saving resumable state and finishing with a checkpoint + manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rich.console import Console

from posttrain.checkpoint import atomic_dir, clean_temp, write_json_atomic
from posttrain.config import CheckpointConfig, DataConfig, RecipeConfig
from posttrain.metrics import MetricsLogger, plot_stage


@dataclass
class StageContext:
    """What a stage loop gets from the pipeline (besides its own typed config)."""

    recipe: RecipeConfig
    run_dir: Path
    stage_dir: Path
    tokenizer: Any  # PreTrainedTokenizerFast
    tokenizer_dir: Path
    init_path: Optional[str]  # HF checkpoint the stage starts from (None: fresh preset)
    logger: MetricsLogger
    console: Console
    seed: int

    @property
    def final_dir(self) -> Path:
        return self.stage_dir / "final"

    @property
    def state_root(self) -> Path:
        return self.stage_dir / "state"


# ------------------------------------------------------------------------------ data
def task_files(ctx: StageContext, data: DataConfig) -> dict[str, Path]:
    """Write the stage's synthetic task (once per run and arguments) and return its files."""
    from posttrain.data import write_task

    assert data.task is not None
    # Stages sharing a task and its arguments share its files (e.g. SFT and RL eval sets);
    # different arguments get their own folder.
    key = hashlib.sha1(json.dumps(data.task_args, sort_keys=True).encode()).hexdigest()[:8]
    out = ctx.run_dir / "data" / (data.task if not data.task_args else f"{data.task}-{key}")
    files = write_task(data.task, out, seed=ctx.recipe.seed, **data.task_args)
    return {k: Path(v) for k, v in files.items()}


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


def shard(items: Sequence[Any], world_size: int, micro_size: int) -> list[list[list[Any]]]:
    """Split a global batch into `world_size` ranks x micro-batches of `micro_size` items."""
    per_rank = len(items) // world_size
    if per_rank * world_size != len(items):
        raise ValueError(f"global batch of {len(items)} does not split over {world_size} learners")
    ranks = [items[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]
    return [[list(r[i:i + micro_size]) for i in range(0, len(r), micro_size)] for r in ranks]


def latest_state(ctx: StageContext) -> Optional[Path]:
    """The newest complete resumable state of this stage (temp dirs are ignored)."""
    clean_temp(ctx.state_root)
    if not ctx.state_root.is_dir():
        return None
    done = sorted(p for p in ctx.state_root.glob("step-*") if (p / "progress.json").exists())
    return done[-1] if done else None


def resume_step(ctx: StageContext, learners: Any, name: str) -> int:
    """Load the stage's newest resumable state into the (configured) learners, if any, and
    drop metrics rows logged after it. Returns the number of optimizer steps already done."""
    start = 0
    state = latest_state(ctx)
    if state is not None:
        start = learners.load_state(str(state))["step"]
        ctx.console.print(f"[cyan]{name}: resuming from step {start} ({state})[/cyan]")
    ctx.logger.truncate(name, start + 1)
    return start


def end_of_step(ctx: StageContext, cfg: Any, learners: Any, done: int, metrics: dict[str, Any],
                evaluate: Callable[[int], Any]) -> None:
    """After optimizer step `done` (1-based) of a stage: log its metrics, then the periodic
    eval and resumable state (the final ones are written by the stage's end)."""
    if done % cfg.log_every == 0 or done == cfg.steps:
        ctx.logger.log(cfg.name, "train", done, metrics)
    if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
        evaluate(done)
    if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
        save_state(ctx, learners, done, cfg.checkpoint)


def save_state(ctx: StageContext, learners: Any, step: int, cfg: CheckpointConfig,
               extra: Optional[dict[str, Any]] = None) -> Path:
    """Atomically write resumable state after `step` optimizer steps; prune old ones."""
    target = ctx.state_root / f"step-{step:06d}"
    with atomic_dir(target) as tmp:
        learners.save_state(str(tmp), {"step": step, **(extra or {})})
    for old in sorted(ctx.state_root.glob("step-*"))[: -max(1, cfg.keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def finish_stage(ctx: StageContext, learners: Any, kind: str, name: str, stage_cfg: Any,
                 eval_metrics: dict[str, Any], train_metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the HF checkpoint (+ tokenizer), plots and the manifest the next stage reads."""
    with atomic_dir(ctx.final_dir) as tmp:
        learners.save_pretrained(str(tmp))
        ctx.tokenizer.save_pretrained(str(tmp))
    plots = plot_stage(ctx.logger, name, ctx.run_dir / "plots")
    manifest = {
        "name": name, "kind": kind, "checkpoint": str(ctx.final_dir),
        "tokenizer": str(ctx.tokenizer_dir), "init_from": ctx.init_path,
        "config": dataclasses.asdict(stage_cfg), "eval": eval_metrics, "train": train_metrics,
        "plots": [str(p) for p in plots],
    }
    write_json_atomic(ctx.stage_dir / "manifest.json", manifest)
    shutil.rmtree(ctx.state_root, ignore_errors=True)  # the final checkpoint supersedes it
    return manifest
