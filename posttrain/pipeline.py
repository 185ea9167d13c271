"""Run a recipe: stages in order, each starting from the previous stage's manifest.

Run directory:

    <run_dir>/recipe.yaml           the resolved recipe (after overrides)
    <run_dir>/tokenizer/            the tokenizer every stage uses (HF format)
    <run_dir>/data/<task>/          synthetic task files, when a stage names a task
    <run_dir>/stages/NN-<name>/     final/ (HF checkpoint), state/ (resumable), manifest.json
    <run_dir>/metrics.jsonl, tensorboard/, plots/*.png, summary.json

Resume: stages with a manifest are skipped; the first unfinished stage continues from its
newest complete state (see posttrain.stages.common.latest_state).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Console
from rich.table import Table

from posttrain.checkpoint import atomic_dir, write_json_atomic
from posttrain.config import ConfigError, RecipeConfig
from posttrain.data import TokenizerConfig, token_ids
from posttrain.evals import format_change
from posttrain.faults import kill_point
from posttrain.metrics import MetricsLogger
from posttrain.stages import STAGES, StageContext


MARKER = ".posttrain-run"  # written first into every run dir: what makes a directory ours


def is_run_dir(path: Path) -> bool:
    """A directory posttrain created: it holds MARKER (or, written before the marker existed,
    a resolved recipe.yaml with the recipe's top-level keys)."""
    if (path / MARKER).is_file():
        return True
    recipe = path / "recipe.yaml"
    if not recipe.is_file():
        return False
    try:
        raw = yaml.safe_load(recipe.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and {"name", "model", "stages", "seed"} <= set(raw)


def prepare_run_dir(cfg: RecipeConfig, *, resume: bool, overwrite: bool) -> Path:
    """The run dir, checked against the caller's intent before anything is written: --resume
    needs an existing run; a run is continued or deleted only when asked; a directory that
    posttrain did not create is never written to nor deleted (ConfigError, untouched)."""
    run_dir = cfg.resolved_run_dir
    exists = run_dir.is_dir()
    ours = exists and is_run_dir(run_dir)
    foreign = exists and not ours and any(run_dir.iterdir())  # an empty directory is free to use
    if foreign:
        raise ConfigError(f"run_dir {run_dir} exists and is not a posttrain run directory (no {MARKER}): "
                          f"left untouched; set run_dir=<a new or empty dir>")
    if resume and not ours:
        raise ConfigError(f"run_dir {run_dir} holds no run to resume: drop --resume to start a new run "
                          f"there, or set run_dir=<the run's dir>")
    if ours and not (resume or overwrite):
        raise ConfigError(f"run_dir {run_dir} already holds a run: pass --resume to continue it, "
                          f"--overwrite to start over, or set run_dir=<another dir>")
    if ours and overwrite and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).touch()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(_yaml_safe(dataclasses.asdict(cfg)), sort_keys=False))
    return run_dir


def prepare_tokenizer(cfg: TokenizerConfig, run_dir: Path):
    """Build (or copy) the run's tokenizer once; later stages and resumes load the saved one."""
    from posttrain.data import build_tokenizer, load_tokenizer

    out = run_dir / "tokenizer"
    if not out.is_dir():
        tok = load_tokenizer(cfg.path) if cfg.kind == "path" else build_tokenizer(cfg.kind)
        with atomic_dir(out) as tmp:
            tok.save_pretrained(str(tmp))
    return load_tokenizer(str(out)), out


def run_recipe(cfg: RecipeConfig, *, resume: bool = False, overwrite: bool = False,
               console: Optional[Console] = None) -> dict[str, Any]:
    from posttrain.cluster import LearnerGroup, Placement, settle_stop, start_ray

    console = console or Console()
    run_dir = prepare_run_dir(cfg, resume=resume or cfg.resume, overwrite=overwrite)
    tokenizer, tok_dir = prepare_tokenizer(cfg.tokenizer, run_dir)
    logger = MetricsLogger(run_dir)
    start_ray(cfg.cluster)
    placement = Placement(cfg.cluster)
    manifests: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    previous: Optional[str] = None
    kept: Optional[tuple[Any, Any]] = None  # (learner group, the stage it just ran) for cluster.reuse_learners
    try:
        for i, stage in enumerate(cfg.stages):
            stage_dir = run_dir / "stages" / f"{i:02d}-{stage.name}"
            source = stage.init_from or previous
            init_path = manifests[source]["checkpoint"] if source else cfg.model.path
            init_adapter = None
            if stage.lora is not None and stage.lora.continue_adapter:  # the source's base + its adapter
                assert source is not None  # RecipeConfig checked it
                init_path, init_adapter = manifests[source]["lora"]["base"], manifests[source]["lora"]["adapter"]
            manifest_path = stage_dir / "manifest.json"
            if manifest_path.exists():
                console.print(f"[green]{stage.name}: already complete, skipped[/green]")
                if kept is not None:  # (stages complete in order: learners are kept only while running)
                    kept[0].shutdown()
                    kept = None
                manifest = json.loads(manifest_path.read_text())
            else:
                console.rule(f"stage {i}: {stage.name} ({stage.kind})")
                ctx = StageContext(cfg.model, cfg.cluster, cfg.seed, run_dir, stage_dir, tokenizer, tok_dir,
                                   init_path, logger, console, seed=cfg.seed + i, placement=placement,
                                   init_adapter=init_adapter)
                if kept is not None and continues(kept[1], stage, source):
                    learners = kept[0]
                    console.print(f"{stage.name}: the learners of {kept[1].name} go on with its final weights",
                                  highlight=False)
                else:
                    if kept is not None:
                        kept[0].shutdown()
                    learners = LearnerGroup(cfg.cluster, cfg.model.with_overrides(stage.model_overrides), init_path,
                                            token_ids=token_ids(tokenizer), seed=cfg.seed, placement=placement)
                kept = None
                console.print(placement_line(learners.placements()), highlight=False)
                try:
                    manifest = STAGES[stage.kind].run(ctx, stage, learners)
                except BaseException:
                    learners.shutdown()
                    raise
                if cfg.cluster.reuse_learners:
                    kept = (learners, stage)
                else:
                    learners.shutdown()
            manifests[stage.name] = manifest
            kill_point("stage_done", stage.name)
            results.append({"name": stage.name, "kind": stage.kind, "eval": manifest.get("eval", {}),
                            "throughput": manifest.get("throughput", {}), "checkpoint": manifest["checkpoint"],
                            "params": manifest.get("params"), "adapter": (manifest.get("lora") or {}).get("adapter")})
            previous = stage.name
    finally:
        if kept is not None:
            kept[0].shutdown()
        logger.close()
        placement.remove()
        settle_stop()  # after a SIGTERM: Ray shut down, the stop watchdog disarmed
    summary = {"recipe": cfg.name, "run_dir": str(run_dir), "stages": results}
    write_json_atomic(run_dir / "summary.json", summary)
    console.print(summary_table(summary))
    console.print(training_table(summary))
    return summary


def continues(last: Any, stage: Any, source: Optional[str]) -> bool:
    """Whether `stage` can train on the learners `last` (the stage run just before it in this
    process) leaves behind: it starts from `last`'s final weights, which those learners hold
    (the checkpoint was written from them), with the same model overrides, and neither stage
    trains LoRA adapters (their checkpoints are a base plus an adapter, not the learners' view)."""
    return (source == last.name and stage.lora is None and last.lora is None
            and stage.model_overrides == last.model_overrides)


def placement_line(ranks: list[dict[str, Any]]) -> str:
    """One line: where each learner rank runs (node, Ray's GPU ids, the device it bound)."""
    return "learners: " + ", ".join(
        f"rank {r} on node {p['node_id'][:8]} gpu {','.join(p['gpu_ids']) or '-'} ({p['device']})"
        for r, p in enumerate(ranks))


# The end-of-run tables: the held-out numbers people look for first (whichever a stage kind has),
# then what each stage trained and how fast. Two tables, so each fits an 80-column terminal
# (a device or CI log has no wider one) with every column a GPU chain fills.
HEADLINE = {"accuracy": "accuracy", "pref_accuracy": "pref acc", "logp_accuracy": "logp acc"}

# Paired held-out changes since the stage's start (posttrain.evals), shown when some stage has one.
GAIN_COLUMNS = {"gain": "acc gain (z)", "sampled_gain": "mean@k gain (z)"}

# Throughput columns, shown when measured (GPU memory only on CUDA).
SPEED = {"tokens_per_s": "tok/s", "gpu_peak_gib": "GPU GiB", "stage_seconds": "seconds"}


def summary_table(summary: dict[str, Any]) -> Table:
    """One row per stage: its headline held-out metrics and its paired gains ("+change (z)")."""
    stages = summary["stages"]
    keys = [k for k in HEADLINE if any(isinstance(st["eval"].get(k), (int, float)) for st in stages)]
    gains = [(k, c) for k, c in GAIN_COLUMNS.items() if any(st["eval"].get(k) for st in stages)]
    table = Table(title=f"{summary['recipe']}: held-out eval per stage (all metrics: summary.json)")
    for col in ["stage", *(HEADLINE[k] for k in keys), *(c for _, c in gains)]:
        table.add_column(col, no_wrap=True)
    for st in stages:
        table.add_row(st["name"], *[_fmt(st["eval"].get(k)) for k in keys],
                      *[_fmt_gain(st["eval"].get(k)) for k, _ in gains])
    return table


def training_table(summary: dict[str, Any]) -> Table:
    """One row per stage: its kind, the share of parameters it trained (LoRA: the adapters'), the
    held-out rows it was scored on, and its throughput and wall time where measured."""
    stages = summary["stages"]
    speed = [k for k in SPEED if any(k in st.get("throughput", {}) for st in stages)]
    table = Table(title=f"{summary['recipe']}: training per stage")
    for col in ["stage", "kind", "trained", "eval n", *(SPEED[k] for k in speed)]:
        table.add_column(col, no_wrap=True)
    for st in stages:
        share = (st.get("params") or {}).get("trainable_share")
        n = st["eval"].get("n", st["eval"].get("pref_pairs"))
        table.add_row(st["name"], st["kind"], "-" if share is None else f"{share:.2%}", _fmt(n),
                      *[_fmt(st.get("throughput", {}).get(k), 1) for k in speed])
    return table


def _fmt_gain(gain: Optional[dict[str, Any]]) -> str:
    """The stage's held-out change since its start and its z (posttrain.evals.paired_gain)."""
    return format_change(gain["delta"], gain["z"]) if gain else "-"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _yaml_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _yaml_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_safe(v) for v in obj]
    return obj
