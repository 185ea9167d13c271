"""Run outputs: metrics.jsonl, TensorBoard events and PNG plots, one writer per run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends `{"stage", "split", "step", ...}` rows to metrics.jsonl and TensorBoard.

    On resume, rows of the current stage at or after the resumed step are dropped first so
    the file describes exactly one trajectory.
    """

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate(self, stage: str, from_step: int) -> None:
        """Drop `stage`'s rows at or after `from_step`, and a last row cut short by a crash
        mid-append; rewritten atomically (a crash here keeps the old file)."""
        from posttrain.data.io import write_text_atomic

        if not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if not (row["stage"] == stage and row["step"] >= from_step):
                keep.append(ln)
        write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def log(self, stage: str, split: str, step: int, values: dict[str, Any]) -> None:
        row = {"stage": stage, "split": split, "step": step}
        row.update({k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.tb.add_scalar(f"{stage}/{split}/{k}", v, step)
        self.tb.flush()

    def rows(self, stage: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        return [r for r in out if stage is None or r["stage"] == stage]

    def close(self) -> None:
        self.tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def plot_stage(logger: MetricsLogger, stage: str, out_dir: Path) -> list[Path]:
    """One PNG per split (train, eval) with a panel per numeric metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = logger.rows(stage)
    written = []
    for split, wanted in (("train", None), ("eval", None)):
        sel = [r for r in rows if r["split"] == split]
        keys = sorted({k for r in sel for k, v in r.items()
                       if k not in ("stage", "split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)})
        if not sel or not keys:
            continue
        keys = keys[:12] if wanted is None else wanted
        cols = min(3, len(keys))
        rows_n = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
        for ax, k in zip(axes.flat, keys):
            pts = [(r["step"], r[k]) for r in sel if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{stage} ({split})")
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stage}_{split}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
