"""`posttrain compare RUN_DIR...`: did each stage help, in each of several runs (seeds, variants)?

Reads every run's metrics.jsonl (finished or not) and, per stage, its first eval (step 0,
before any update) and its last. A stage's change is paired when the last eval carries `gain`
(posttrain.evals.paired_gain: the same rows scored before and after); runs written before
per-row hits were kept get the unpaired SE of two accuracies instead, marked `u`:

    se_unpaired = sqrt(p0 (1 - p0) / n0 + p1 (1 - p1) / n1)

A stage whose last eval carries another paired gain (posttrain.evals.EXTRA_GAINS: a DPO stage's
`pref_gain`, held-out preference accuracy; `sampled_gain`, mean@k with `eval.sampled`) gets a
column for each, "STAGE (pref)", "STAGE (sampled)".

Prints one row per run and one column per stage, "+change (z)", and a last row with how many
runs changed each stage beyond noise (|z| > 2); draws the changes with +-2 SE bars as a PNG.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rich.table import Table

from posttrain.evals import EXTRA_GAINS, format_change

BEYOND = 2.0  # |z| above which a change counts as beyond noise


class CompareError(ValueError):
    """A run dir that cannot be read: one line naming the file (and row)."""


@dataclass(frozen=True)
class StageChange:
    """A stage's held-out accuracy from its first eval to its last."""

    stage: str
    start: float
    end: float
    n: int
    delta: float
    se: Optional[float]  # None: no noise estimate (n < 2, or nothing varied)
    z: Optional[float]
    paired: bool


def stage_changes(run_dir: Path) -> list[StageChange]:
    """The changes of every stage of `run_dir` whose first eval is at step 0 and that has a later
    one, in the order the stages ran."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CompareError(f"{path}: not found (is {run_dir} a posttrain run dir?)")
    evals: dict[str, list[dict]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompareError(f"{path} line {i}: not JSON ({e.msg})") from None
        if row.get("split") == "eval" and isinstance(row.get("accuracy"), (int, float)) and row.get("n"):
            evals.setdefault(row["stage"], []).append(row)
    out = []
    for stage, rows in evals.items():
        first, last = min(rows, key=lambda r: r["step"]), max(rows, key=lambda r: r["step"])
        if first["step"] != 0 or last["step"] == 0:
            continue
        gain = last.get("gain")
        if gain:
            out.append(_paired(stage, gain))
        else:
            p0, n0, p1, n1 = first["accuracy"], int(first["n"]), last["accuracy"], int(last["n"])
            se = math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
            out.append(StageChange(stage, p0, p1, n1, p1 - p0, se or None, (p1 - p0) / se if se else None, False))
        for key, (label, _, _) in EXTRA_GAINS.items():
            if last.get(key):
                out.append(_paired(f"{stage} ({label})", last[key]))
    return out


def _paired(stage: str, gain: dict) -> StageChange:
    return StageChange(stage, gain["start"], gain["end"], gain["n"], gain["delta"], gain["se"], gain["z"], True)


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (their dir names, where those differ)."""
    parts = [Path(d).absolute().parts for d in run_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def compare_table(labels: Sequence[str], runs: Sequence[list[StageChange]]) -> Table:
    """One row per run, one column per stage: '+change (z)'; a last row counts, per stage, the
    runs whose change was beyond noise."""
    stages = list(dict.fromkeys(c.stage for changes in runs for c in changes))
    table = Table(title="held-out accuracy change per stage (pref: preference accuracy; sampled: mean@k): +change (z)",
                  caption=f"z = change / SE of the paired difference (u: of two unpaired accuracies); "
                          f"beyond noise: |z| > {BEYOND:g}")
    for col in ["run", *stages]:
        table.add_column(col, no_wrap=True)
    for label, changes in zip(labels, runs):
        by = {c.stage: c for c in changes}
        table.add_row(label, *[_cell(by.get(s)) for s in stages])
    verdicts = []
    for stage in stages:
        zs = [c.z for changes in runs for c in changes if c.stage == stage and c.z is not None]
        up, down = sum(z > BEYOND for z in zs), sum(z < -BEYOND for z in zs)
        verdicts.append(f"up {up} of {len(zs)}" + (f", down {down}" if down else ""))
    table.add_section()
    table.add_row("beyond noise", *verdicts)
    return table


def _cell(c: Optional[StageChange]) -> str:
    return "-" if c is None else format_change(c.delta, c.z, "" if c.paired else "u")


def plot_changes(labels: Sequence[str], runs: Sequence[list[StageChange]], path: Path) -> Path:
    """Grouped bars: one group per stage, one bar per run (its change), +-2 SE whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(c.stage for changes in runs for c in changes))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + len(stages) * (0.6 + 0.25 * len(runs))), 4.0))
    for j, (label, changes) in enumerate(zip(labels, runs)):
        by = {c.stage: c for c in changes}
        xs = [i + (j - (len(runs) - 1) / 2) * width for i, s in enumerate(stages) if s in by]
        cs = [by[s] for s in stages if s in by]
        ax.bar(xs, [c.delta for c in cs], width, label=label,
               yerr=[BEYOND * (c.se or 0.0) for c in cs], capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("held-out accuracy change")
    ax.set_title(f"change per stage, bars +-{BEYOND:g} SE (paired where the run kept per-row hits)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
