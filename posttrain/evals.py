"""Held-out evaluation of generated answers, shared by every stage kind.

`held_out_eval` greedy-decodes the eval prompts and returns {"accuracy", "n"}; when every row
carries `length` and `depth` metadata (long-context retrieval) it is `needle_eval`, which also
reports accuracy per context cell and draws a heatmap. So an sft, dpo or rl stage on the needle
task reports the same cells.

`needle_eval` greedy-decodes every eval prompt (through the rollout engines on learner rank
0, like the plain exact-match path), checks it against its answer and groups
the hits by the row's `length` and `depth` metadata (posttrain.data.tasks.needle writes them;
any prompt_completion / rl file with those two keys works). It returns

    {"accuracy": overall, "n": rows,
     "needle": {"cells": [{"length", "depth", "accuracy", "n"}, ...], "plot": PNG path}}

and draws the cells as a heatmap (depth down, length across).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from posttrain.config import EvalConfig


def has_cells(records: Sequence[Any]) -> bool:
    """True when every record carries numeric `length` and `depth` metadata."""
    return bool(records) and all(
        isinstance(getattr(r, "meta", {}).get("length"), (int, float))
        and isinstance(getattr(r, "meta", {}).get("depth"), (int, float))
        for r in records
    )


def cell_accuracy(lengths: Sequence[float], depths: Sequence[float], hits: Sequence[bool]) -> list[dict[str, Any]]:
    """Accuracy per (length, depth) cell, sorted by length then depth."""
    if not len(lengths) == len(depths) == len(hits):
        raise ValueError(f"cell_accuracy: {len(lengths)} lengths, {len(depths)} depths, {len(hits)} hits")
    groups: dict[tuple[float, float], list[bool]] = defaultdict(list)
    for length, depth, hit in zip(lengths, depths, hits):
        groups[(length, depth)].append(bool(hit))
    return [{"length": length, "depth": depth, "accuracy": sum(h) / len(h), "n": len(h)}
            for (length, depth), h in sorted(groups.items())]


def plot_cells(cells: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Heatmap PNG of cell accuracies: x = context length, y = needle depth (0 = top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(int(x)) if float(x).is_integer() else str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def greedy_hits(ctx: Any, learners: Any, records: Sequence[Any], check: Callable[[str, str], bool],
                max_new_tokens: int) -> list[bool]:
    """Greedy-decode each record's prompt on learner rank 0; hit = check(decoded text, answer)."""
    from posttrain.data import encode_prompt
    from posttrain.generation import greedy_generate

    prompts = [encode_prompt(r, ctx.tokenizer) for r in records]
    outs = learners.call_rank0(greedy_generate, prompts, max_new_tokens=max_new_tokens,
                               stop_token_ids=[ctx.tokenizer.eos_token_id])
    return [bool(check(ctx.tokenizer.decode(ids, skip_special_tokens=True), _reference(r)))
            for r, ids in zip(records, outs)]


def _reference(rec: Any) -> str:
    for key in ("answer", "completion"):
        if hasattr(rec, key):
            return getattr(rec, key)
    raise ValueError(f"eval record {type(rec).__name__} has no reference answer")


def held_out_eval(ctx: Any, learners: Any, records: Sequence[Any], task: Optional[str], cfg: EvalConfig, *,
                  stage: str, step: int) -> dict[str, Any]:
    """Greedy exact match on the first `eval.limit` rows ({"accuracy", "n"}; {} without rows),
    or `needle_eval` when the rows carry (length, depth) cells. `task` picks the answer check
    (the task's own `check`; without a task, stripped string equality)."""
    records = list(records)
    if not records:
        return {}
    if has_cells(records):
        return needle_eval(ctx, learners, records, task, cfg, stage=stage, step=step)
    records = records[: cfg.limit] if cfg.limit else records
    hits = greedy_hits(ctx, learners, records, answer_check(task), cfg.max_new_tokens)
    return {"accuracy": sum(hits) / len(hits), "n": len(hits)}


def answer_check(task: Optional[str]) -> Callable[[str, str], bool]:
    from posttrain.data import TASKS

    return TASKS[task].check if task else (lambda text, ref: text.strip() == str(ref).strip())


def needle_eval(ctx: Any, learners: Any, records: Sequence[Any], task: Optional[str], cfg: EvalConfig, *,
                stage: str, step: int) -> dict[str, Any]:
    """Retrieval accuracy overall and per (length, depth) cell; writes
    <run_dir>/plots/<stage>_needle_step<step>.png. `eval.limit` takes the first rows of
    each cell (not of the file), so every cell stays represented."""
    records = list(records)
    if not has_cells(records):
        raise ValueError(f"{stage}: needle eval needs `length` and `depth` on every eval row")
    if cfg.limit:
        records = _per_cell_limit(records, cfg.limit)
    hits = greedy_hits(ctx, learners, records, answer_check(task), cfg.max_new_tokens)
    cells = cell_accuracy([r.meta["length"] for r in records], [r.meta["depth"] for r in records], hits)
    accuracy = sum(hits) / len(hits)
    plot = plot_cells(cells, ctx.run_dir / "plots" / f"{stage}_needle_step{step}.png",
                      f"{stage} step {step}: retrieval accuracy {accuracy:.2f} (n={len(hits)})")
    return {"accuracy": accuracy, "n": len(hits), "needle": {"cells": cells, "plot": str(plot)}}


def _per_cell_limit(records: list[Any], limit: int) -> list[Any]:
    """At most ceil(limit / n_cells) rows of each cell, in file order."""
    keys = {(r.meta["length"], r.meta["depth"]) for r in records}
    per_cell = max(1, -(-limit // len(keys)))
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    for r in records:
        key = (r.meta["length"], r.meta["depth"])
        if seen[key] < per_cell:
            seen[key] += 1
            out.append(r)
    return out
