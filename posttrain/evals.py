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

Every eval also writes its per-row hits to <stage_dir>/eval/<stage>-step<N>.json. From the
second eval of a stage on, the result carries `gain`: the change since the stage's first eval
(step 0, before any update) on the same rows, with the standard error of that paired difference
(`paired_gain`). Did the stage help beyond noise is then read from one number, z. A DPO stage
pairs its held-out preference pairs the same way (`scores_gain`, as `pref_gain`).

With `eval.sampled` ({n: k, temperature: T}) every eval also samples k completions per
held-out prompt at temperature T and scores each row by the share of them that are right
(mean@k): `sampled` {"accuracy", "k", "temperature"}, and from the second eval `sampled_gain`,
paired like `gain`. That is what an RL stage optimises (its expected reward at its sampling
temperature), where greedy accuracy moves only when a row's most likely answer flips; averaging
k samples per row also shrinks the per-row noise. The samples are seeded by the recipe's seed, the
same at every eval of every stage, so an unchanged policy draws the same completions: the paired
difference holds only what the updates changed (common random numbers), and a stage's step 0
scores what the previous stage ended on (its last eval, up to GPU nondeterminism) rather than
another draw from the same policy.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from posttrain.data.io import write_json_atomic
from posttrain.data.tasks.needle import cell_accuracy, has_cells, per_cell_limit, plot_cells


@dataclass(frozen=True)
class AlsoEval:
    """Another synthetic task's held-out set, evaluated at every eval of the stage (the recipe's
    `stages[i].eval.also[j]`): e.g. the short-context task during long-context SFT, so that
    forgetting shows in the stage's own metrics (`eval.also.<task>`) instead of only when a later
    stage trains on that task again. The task's files are the ones any stage with the same task
    and arguments uses (the same held-out rows)."""

    task: str
    task_args: dict[str, Any] = field(default_factory=dict)
    limit: Optional[int] = None  # the first N held-out rows (needle: spread over the cells)
    max_new_tokens: Optional[int] = None  # greedy budget; default: the stage's eval.max_new_tokens

    def __post_init__(self) -> None:
        from posttrain.data.config import _known_task

        _known_task(self.task, "task", self.task_args)
        if self.limit is not None and not self.limit >= 1:
            raise ValueError(f"limit: must be null or >= 1, got {self.limit}")
        if self.max_new_tokens is not None and not self.max_new_tokens >= 1:
            raise ValueError(f"max_new_tokens: must be null or >= 1, got {self.max_new_tokens}")


# The paired gains an eval can carry besides `gain` (greedy accuracy), as tables and the stage's
# closing lines name them: key -> (column label, what is scored, (rows that went up, down)).
EXTRA_GAINS = {
    "pref_gain": ("pref", "preference accuracy", ("pairs ranked better now", "worse now")),
    "sampled_gain": ("sampled", "sampled accuracy (mean@k)", ("rows better now", "worse now")),
}


@dataclass(frozen=True)
class SampledEval:
    """The recipe's `stages[i].eval.sampled`: k samples per held-out prompt at a temperature,
    scored as the share right (mean@k, posttrain.evals module doc)."""

    n: int = 8  # samples per held-out prompt (k)
    temperature: float = 1.0  # > 0: greedy is the eval's plain accuracy already

    def __post_init__(self) -> None:
        if not self.n >= 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: must be a finite number > 0 (0 is the greedy accuracy), "
                             f"got {self.temperature}")


@dataclass(frozen=True)
class EvalConfig:
    """A stage's held-out evaluation (the recipe's `stages[i].eval:`)."""

    every: int = 0  # optimizer steps between evals; 0: only before the first and after the last step
    max_new_tokens: int = 16  # greedy decoding budget per eval prompt
    limit: Optional[int] = None  # evaluate the first N eval rows (needle: N spread over the cells)
    also: list[AlsoEval] = field(default_factory=list)  # other tasks' held-out sets, one entry per task
    sampled: Optional[SampledEval] = None  # also mean@k at a temperature (null: greedy only)

    def __post_init__(self) -> None:
        if not self.every >= 0:
            raise ValueError(f"every: must be >= 0, got {self.every}")
        if not self.max_new_tokens >= 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and not self.limit >= 1:
            raise ValueError(f"limit: must be null or >= 1, got {self.limit}")
        tasks = [a.task for a in self.also]
        for j, task in enumerate(tasks):
            if task in tasks[:j]:
                raise ValueError(f"also[{j}].task: {task!r} is already in eval.also (one entry per task)")


def greedy_hits(ctx: Any, learners: Any, records: Sequence[Any], check: Callable[[str, str], bool],
                max_new_tokens: int) -> list[bool]:
    """Greedy-decode each record's prompt on learner rank 0; hit = check(decoded text, answer)."""
    return [h[0] for h in _hits(ctx, learners, records, check, max_new_tokens, 1, 0.0, None)]


def sampled_scores(ctx: Any, learners: Any, records: Sequence[Any], check: Callable[[str, str], bool],
                   max_new_tokens: int, sampled: SampledEval) -> list[float]:
    """Per record, the share of `sampled.n` completions sampled at `sampled.temperature` (on
    learner rank 0, seeded by the recipe's seed: the same draws in every eval of every stage)
    that check right."""
    hits = _hits(ctx, learners, records, check, max_new_tokens, sampled.n, sampled.temperature, ctx.run_seed)
    return [sum(h) / len(h) for h in hits]


def _hits(ctx: Any, learners: Any, records: Sequence[Any], check: Callable[[str, str], bool], max_new_tokens: int,
          n: int, temperature: float, seed: Optional[int]) -> list[list[bool]]:
    from posttrain.data import encode_prompt
    from posttrain.rollout import SamplingParams, generate_on_model

    prompts = [encode_prompt(r, ctx.tokenizer) for r in records]
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=(ctx.tokenizer.eos_token_id,))
    outs = learners.call_rank0(generate_on_model, prompts, params)  # prompt-major, n per prompt
    return [[bool(check(ctx.tokenizer.decode(ids, skip_special_tokens=True), _reference(r)))
             for ids in outs[i * n:(i + 1) * n]] for i, r in enumerate(records)]


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
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), **gain_since_start(ctx, records, hits, stage, step),
            **sampled_eval(ctx, learners, records, task, cfg, stage, step)}


def sampled_eval(ctx: Any, learners: Any, records: Sequence[Any], task: Optional[str], cfg: EvalConfig,
                 stage: str, step: int) -> dict[str, Any]:
    """With `cfg.sampled`: {"sampled": {"accuracy" (mean@k), "k", "temperature"}} and, after
    step 0, "sampled_gain" (paired_gain of the per-row shares since step 0); {} without it."""
    if cfg.sampled is None:
        return {}
    scores = sampled_scores(ctx, learners, records, answer_check(task), cfg.max_new_tokens, cfg.sampled)
    out: dict[str, Any] = {"sampled": {"accuracy": sum(scores) / len(scores), "k": cfg.sampled.n,
                                       "temperature": cfg.sampled.temperature}}
    gain = scores_gain(ctx, _rows_digest(records) + f"|k={cfg.sampled.n}|T={cfg.sampled.temperature:g}", scores,
                       f"{stage}-sampled", step)
    if gain:
        out["sampled_gain"] = gain
    return out


def paired_gain(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    """The change of a mean score between two evals of the same n rows, row i scored before_i
    then after_i, each in [0, 1]: a hit (True/False, exact match) or a preference pair's score
    (1 ranked right, 0.5 tied, 0 wrong). With d_i = after_i - before_i:

        delta = mean(d) = mean(after) - mean(before)
        se    = sqrt(sum_i (d_i - delta)^2 / (n - 1) / n)     (standard error of a paired mean)
        z     = delta / se

    Pairing takes each row's own difficulty out of the noise: rows that stay right (or wrong)
    add nothing to se. Where the two evals' hits go together, as when a stage moves a few rows
    of many, se is well under the unpaired sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n) of two
    independent samples. se and z are None for n < 2; z is None when se is 0 (no row changed,
    or all changed the same way). improved / regressed count the rows with d_i > 0 / < 0."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain needs two equally long, non-empty score lists, got {len(before)} and {len(after)}")
    for name, xs in (("before", before), ("after", after)):
        bad = next((x for x in xs if not 0.0 <= float(x) <= 1.0), None)
        if bad is not None:
            raise ValueError(f"paired_gain: {name} holds {bad!r}; scores are in [0, 1]")
    n = len(before)
    d = [float(a) - float(b) for b, a in zip(before, after)]
    delta = sum(d) / n
    se = math.sqrt(sum((x - delta) ** 2 for x in d) / (n - 1) / n) if n > 1 else None
    return {"start": sum(map(float, before)) / n, "end": sum(map(float, after)) / n, "delta": delta, "se": se,
            "z": delta / se if se else None, "n": n, "improved": sum(x > 0 for x in d),
            "regressed": sum(x < 0 for x in d)}


def format_change(delta: float, z: Optional[float], mark: str = "") -> str:
    """A held-out change and its z as tables show them: '+0.123 (4.5)'; '-' for an undefined z;
    `mark` right after z (compare's 'u' for an unpaired one)."""
    return f"{delta:+.3f} ({'-' if z is None else format(z, '.1f')}{mark})"


def gain_since_start(ctx: Any, records: Sequence[Any], hits: Sequence[bool], stage: str, step: int) -> dict[str, Any]:
    """Write this eval's hits beside the stage (<stage_dir>/eval/<stage>-step<step>.json, with a
    digest of its rows); after step 0, {"gain": paired_gain(step 0's hits, these)} when the
    stage's step-0 eval scored the same rows, else {}. A resumed stage finds its step-0 file
    from before the interruption."""
    gain = scores_gain(ctx, _rows_digest(records), [int(bool(h)) for h in hits], stage, step)
    return {"gain": gain} if gain else {}


def _rows_digest(records: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps([[str(getattr(r, "prompt", "")), _reference(r)] for r in records]).encode()).hexdigest()


def scores_gain(ctx: Any, rows: str, scores: Sequence[float], name: str, step: int) -> Optional[dict[str, Any]]:
    """Keep one eval's per-row scores in [0, 1] (<stage_dir>/eval/<name>-step<step>.json, with
    `rows`, a digest of what was scored); after step 0, paired_gain(step 0's scores, these) when
    step 0 scored the same rows, else None."""
    write_json_atomic(_hits_path(ctx, name, step), {"rows": rows, "hits": list(scores)})
    first = _hits_path(ctx, name, 0)
    if step == 0 or not first.exists():
        return None
    start = json.loads(first.read_text())
    return paired_gain(start["hits"], scores) if start["rows"] == rows else None


def _hits_path(ctx: Any, stage: str, step: int) -> Path:
    return Path(ctx.stage_dir) / "eval" / f"{stage}-step{step}.json"


def answer_check(task: Optional[str]) -> Callable[[str, str], bool]:
    """The task's own check; a task judged by running the answer (check None, e.g. coding) is
    correct where its reward scores 1.0 (a reward error is a miss); no task: string equality."""
    from posttrain.data import TASKS

    if not task:
        return lambda text, ref: text.strip() == str(ref).strip()
    t = TASKS[task]
    if t.check is not None:
        return t.check
    from posttrain.rollout import resolve_reward

    reward = resolve_reward(t.reward or "")

    def check(text: str, ref: str) -> bool:
        try:
            return reward(text, ref) == 1.0
        except Exception:  # noqa: BLE001 - a program that crashed or was killed is wrong
            return False

    return check


def needle_eval(ctx: Any, learners: Any, records: Sequence[Any], task: Optional[str], cfg: EvalConfig, *,
                stage: str, step: int) -> dict[str, Any]:
    """Retrieval accuracy overall and per (length, depth) cell; writes
    <run_dir>/plots/<stage>_needle_step<step>.png. `eval.limit` takes the first rows of
    each cell (not of the file), so every cell stays represented."""
    records = list(records)
    if not has_cells(records):
        raise ValueError(f"{stage}: needle eval needs `length` and `depth` on every eval row")
    if cfg.limit:
        records = per_cell_limit(records, cfg.limit)
    hits = greedy_hits(ctx, learners, records, answer_check(task), cfg.max_new_tokens)
    cells = cell_accuracy([r.meta["length"] for r in records], [r.meta["depth"] for r in records], hits)
    accuracy = sum(hits) / len(hits)
    plot = plot_cells(cells, ctx.run_dir / "plots" / f"{stage}_needle_step{step}.png",
                      f"{stage} step {step}: retrieval accuracy {accuracy:.2f} (n={len(hits)})")
    return {"accuracy": accuracy, "n": len(hits), "needle": {"cells": cells, "plot": str(plot)},
            **gain_since_start(ctx, records, hits, stage, step), **sampled_eval(ctx, learners, records, task, cfg, stage, step)}
