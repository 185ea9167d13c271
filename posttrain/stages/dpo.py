"""The `dpo` stage: offline preference optimisation (DPO, IPO, hinge, robust; + RPO's NLL).

Loop: pairs (from files, or sampled from the starting model and scored with the stage's
reward; saved in the stage dir) -> reference log-probs of every pair, computed once with the
starting model before any update (saved beside the pairs) -> (resume) -> for each optimizer
step: pick the step's pairs, shard them over learner ranks into micro-batches, one learner
step with the DPO objective (mean over the step's pairs) -> log -> periodic eval (held-out
preference accuracy + the task's exact-match) and resumable state -> final eval, checkpoint
and manifest. A resumed run reuses the saved pairs and reference log-probs.

Batches are right-padded (chosen and rejected rows of a micro-batch side by side), or, with
`data.pack: true` (long context), each micro-batch's `batch.micro_size` pairs become 2B
documents packed into rows of `data.max_seq_len` tokens (best-fit decreasing; a pair stays in
its micro-batch; positions restart per document and nothing crosses a document boundary).
Every row is one forward; sequence log-probs are per-document sums, so the loss equals the
padded one. Reference log-probs and the held-out eval use the same batches. Packed pairs are
never truncated: a prompt + response longer than data.max_seq_len stops the stage, naming the
file and pair. Chunked LM-head CE (learner.loss_chunk_size) and gradient checkpointing
(learner.gradient_checkpointing) apply as in SFT.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from posttrain.checkpoint import write_json_atomic, write_jsonl_atomic
from posttrain.cluster import ClusterConfig
from posttrain.data import load_records
from posttrain.evals import held_out_eval, scores_gain
from posttrain.learner import Learners
from posttrain.objectives import DPOObjective, PreferenceLoss, SigmoidDPOLoss, StepCounts
from posttrain.progress import stage_progress
from posttrain.stages.common import (
    BatchConfig, StageConfig, StageContext, also_evals, batch_indices, check_finite, end_of_step, finish_stage,
    micro_batches, resume_step, task_files,
)
from posttrain.stages.dpo_pairs import (
    Pair, PairsConfig, compute_reference, encode_pairs, fingerprint, generate_pair_rows, preference_batch,
    with_reference,
)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class DPOStageConfig(StageConfig):
    """Offline DPO: the common stage fields plus where pairs come from, the loss and `batch`
    (whose sizes count pairs; each pair is two sequences)."""

    kind: Literal["dpo"] = "dpo"
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: PreferenceLoss = field(default_factory=SigmoidDPOLoss)
    task_eval: Optional[str] = None  # an rl-format file (prompt + answer) for exact match; default: the task's rl_eval
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        d, p = self.data, self.pairs
        want = "preference" if p.source == "file" else "rl"
        checks = [
            (d.format == want, "data.format",
             f"must be {want!r} for a dpo stage with pairs.source={p.source}, got {d.format!r}"),
            (p.source == "policy" or d.train is not None, "data.train",
             "pairs.source=file needs a preference file in data.train (tasks ship prompts, not pairs)"),
            (not d.mix, "data.mix", "only sft stages mix data sources"),
            (not d.pack or d.pack_mode == "bfd", "data.pack_mode",
             f"dpo packs whole documents (bfd); a preference response is never split, got {d.pack_mode!r}"),
            (self.task_eval is None or Path(self.task_eval).exists(), "task_eval", f"file not found: {self.task_eval}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")

    def check_cluster(self, cluster: ClusterConfig) -> None:
        self.batch.check_learners(cluster.learners)

    def check_files(self) -> None:
        super().check_files()
        if self.task_eval is not None:
            from posttrain.data import DataError, scan_file

            try:
                scan_file(self.task_eval, "rl", on_bad_row=self.data.on_bad_row)
            except DataError as e:
                raise ValueError(f"task_eval: {e}") from None


def run_dpo(ctx: StageContext, cfg: DPOStageConfig, learners: Learners) -> dict[str, Any]:
    world = learners.world_size
    objective = DPOObjective(cfg.loss, chunk_size=cfg.learner.loss_chunk_size)
    learners.configure(cfg.optim, cfg.schedule, cfg.learner, cfg.steps, cfg.lora, ctx.init_adapter,
                       profile_dir=str(ctx.profile_dir))
    # Both need the starting model: they run before any resumed state is loaded.
    train_pairs, eval_pairs = prepare_pairs(ctx, cfg, learners)
    train_pairs, eval_pairs = prepare_reference(ctx, cfg, learners, train_pairs, eval_pairs)
    task_records = load_task_eval(ctx, cfg)
    pad_id = ctx.tokenizer.pad_token_id
    pack_len = cfg.data.max_seq_len if cfg.data.pack else None
    if pack_len:
        longest = max(max(len(p.chosen), len(p.rejected)) for p in train_pairs + eval_pairs)
        ctx.console.print(f"{cfg.name}: {cfg.batch.micro_size} pairs per micro-batch packed into rows of "
                          f"{pack_len} tokens (longest document: {longest})")
    start = resume_step(ctx, learners, cfg.name)

    def evaluate(step: int) -> dict[str, Any]:
        metrics = held_out_eval(ctx, learners, task_records, cfg.data.task, cfg.eval, stage=cfg.name, step=step)
        metrics.update(preference_eval(learners, objective, eval_pairs, pad_id, cfg.batch.micro_size, pack_len,
                                       gain_at=(ctx, cfg.name, step)))
        metrics.update(also_evals(ctx, learners, cfg.eval, stage=cfg.name, step=step))
        ctx.logger.log(cfg.name, "eval", step, metrics)
        return metrics

    if start == 0:
        evaluate(0)
    last: dict[str, Any] = {}
    with stage_progress(ctx.console, cfg.name, cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            idx = batch_indices(len(train_pairs), cfg.batch.global_size, step, ctx.seed)
            step_pairs = [train_pairs[i] for i in idx]
            micro = micro_batches(step_pairs, world, cfg.batch.micro_size,
                                  lambda mb: preference_batch(mb, pad_id, pack_len))
            sent = time.perf_counter()
            last = learners.train_step(objective, micro, StepCounts(sequences=len(step_pairs)))
            last["time/learner"] = time.perf_counter() - sent  # the learners' round trip; the rest of time/step is here
            check_finite(ctx, cfg.name, step + 1, last)
            bar.advance(loss=last["loss"], acc=last["rewards/accuracies"])
            end_of_step(ctx, cfg, learners, step + 1, last, evaluate)
    final = evaluate(cfg.steps)
    return finish_stage(ctx, learners, cfg, final, last)


# --------------------------------------------------------------------------- pairs
def pairs_dir(ctx: StageContext) -> Path:
    return ctx.stage_dir / "pairs"


def prepare_pairs(ctx: StageContext, cfg: DPOStageConfig, learners: Learners) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) encoded pairs: from data.train/data.eval, or generated (once) by the policy."""
    if cfg.pairs.source == "policy":  # generation already held out the eval pairs
        train_path, eval_path = generated_pair_files(ctx, cfg, learners)
        train = _load_pairs(ctx, cfg, train_path)
        held_out = _load_pairs(ctx, cfg, eval_path) if eval_path else []
    else:
        train_path = Path(cfg.data.train)
        train = _load_pairs(ctx, cfg, train_path)
        if cfg.data.eval:
            held_out = _load_pairs(ctx, cfg, Path(cfg.data.eval))
        else:
            train, held_out = split_off(train, cfg.pairs.eval_fraction)
    if not train:
        raise ValueError(f"{cfg.name}: no training pairs left in {train_path}")
    ctx.console.print(f"{cfg.name}: {len(train)} training pairs, {len(held_out)} held-out pairs")
    return train, held_out


def split_off(items: list[T], fraction: float) -> tuple[list[T], list[T]]:
    """The last ceil(fraction * n) items are held out (at least one stays for training)."""
    n_eval = min(len(items) - 1, math.ceil(fraction * len(items)))
    return (items[:-n_eval], items[-n_eval:]) if n_eval > 0 else (items, [])


def _load_pairs(ctx: StageContext, cfg: DPOStageConfig, path: Path) -> list[Pair]:
    res = load_records(path, "preference", on_bad_row=cfg.data.on_bad_row)
    if res.n_skipped:
        ctx.console.print(f"[yellow]{path}: skipped {res.n_skipped} malformed rows (first: {res.errors[0]})[/yellow]")
    return encode_pairs(res.records, ctx.tokenizer, cfg.data.max_seq_len, path, truncate=not cfg.data.pack)


def generated_pair_files(ctx: StageContext, cfg: DPOStageConfig, learners: Learners) -> tuple[Path, Optional[Path]]:
    """Sample, score and save pairs unless a previous run of this stage already did."""
    out = pairs_dir(ctx)
    train_path, eval_path, info_path = out / "train.jsonl", out / "eval.jsonl", out / "info.json"
    if info_path.exists():  # written last: the files are complete
        ctx.console.print(f"[cyan]{cfg.name}: reusing generated pairs in {out}[/cyan]")
        return train_path, eval_path if eval_path.stat().st_size else None
    files = task_files(ctx, cfg.data) if cfg.data.task else {}
    # arithmetic ships a separate prompt file for pair generation; needle only its rl prompts
    prompt_file = Path(cfg.data.train) if cfg.data.train else files.get("prompts", files.get("rl_train"))
    records = load_records(prompt_file, "rl", on_bad_row=cfg.data.on_bad_row).records
    records = records[: cfg.pairs.num_prompts] if cfg.pairs.num_prompts else records
    ctx.console.print(f"{cfg.name}: sampling {cfg.pairs.sampling.n} completions for each of "
                      f"{len(records)} prompts ({prompt_file})")
    rows, stats = generate_pair_rows(learners, ctx.tokenizer, records, cfg.pairs, ctx.seed)
    if cfg.data.eval:
        eval_records = load_records(cfg.data.eval, "rl", on_bad_row=cfg.data.on_bad_row).records
        eval_rows, eval_stats = generate_pair_rows(learners, ctx.tokenizer, eval_records, cfg.pairs, ctx.seed + 1)
        stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
    else:
        rows, eval_rows = split_off(rows, cfg.pairs.eval_fraction)
    if not rows:
        raise ValueError(f"{cfg.name}: no preference pairs: every prompt's {cfg.pairs.sampling.n} samples "
                         f"got the same {cfg.pairs.reward.fn} reward (raise pairs.sampling.temperature or n, "
                         f"or start from a better model)")
    write_jsonl_atomic(train_path, rows)
    write_jsonl_atomic(eval_path, eval_rows)
    write_json_atomic(info_path, {"prompt_file": str(prompt_file), "model": ctx.init_path, **stats})
    ctx.logger.log(cfg.name, "pairs", 0, stats)
    ctx.console.print(f"{cfg.name}: {len(rows)} + {len(eval_rows)} held-out pairs from {len(records)} prompts "
                      f"(mean reward {stats['reward/mean']:.3f}) -> {out}")
    return train_path, eval_path if eval_rows else None


# ------------------------------------------------------------------------ reference
def prepare_reference(ctx: StageContext, cfg: DPOStageConfig, learners: Learners, train: list[Pair],
                      held_out: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """Attach the starting model's sequence log-probs to every pair, computing them only when
    ref_logps.json is missing or belongs to other pairs / another starting model."""
    path = pairs_dir(ctx) / "ref_logps.json"
    key = fingerprint(train + held_out, ctx.init_path)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key:
            ctx.console.print(f"[cyan]{cfg.name}: reusing reference log-probs in {path}[/cyan]")
            return with_reference(train, saved["train"]), with_reference(held_out, saved["eval"])
        ctx.console.print(f"[yellow]{cfg.name}: {path} belongs to other pairs or another model; recomputing[/yellow]")
    ref = compute_reference(learners, train + held_out, ctx.tokenizer.pad_token_id, cfg.batch.micro_size,
                            cfg.learner.loss_chunk_size, cfg.data.max_seq_len if cfg.data.pack else None)
    write_json_atomic(path, {"fingerprint": key, "model": ctx.init_path,
                             "train": ref[:len(train)], "eval": ref[len(train):]})
    ctx.console.print(f"{cfg.name}: reference log-probs of {len(ref)} pairs -> {path}")
    return with_reference(train, ref[:len(train)]), with_reference(held_out, ref[len(train):])


# ---------------------------------------------------------------------------- eval
def load_task_eval(ctx: StageContext, cfg: DPOStageConfig) -> list[Any]:
    """rl records (prompt + answer) for the exact-match eval: task_eval, else the task's rl_eval."""
    if cfg.task_eval:
        path = Path(cfg.task_eval)
    elif cfg.data.task:
        path = task_files(ctx, cfg.data)["rl_eval"]
    else:
        return []
    return list(load_records(path, "rl", on_bad_row=cfg.data.on_bad_row).records)


def preference_eval(learners: Learners, objective: DPOObjective, pairs: list[Pair], pad_id: int, micro_size: int,
                    pack_len: Optional[int] = None, gain_at: Optional[tuple[Any, str, int]] = None) -> dict[str, Any]:
    """Held-out pairs: pref_accuracy (implicit reward ranks chosen first; ties count 1/2),
    logp_accuracy (raw log-probs do), pref_loss and the reward margin, means over pairs.
    pack_len: pack each micro-batch into rows of that many tokens (as training does).
    gain_at (ctx, stage, step): keep each pair's score and, after step 0, add `pref_gain`, the
    paired change of pref_accuracy since the stage's step-0 eval (posttrain.evals.paired_gain)."""
    world = learners.world_size
    pairs = pairs[: len(pairs) - len(pairs) % world]
    if not pairs:
        return {}
    micro = micro_batches(pairs, world, micro_size, lambda mb: preference_batch(mb, pad_id, pack_len))
    m = learners.evaluate(dataclasses.replace(objective, per_pair=True), micro, StepCounts(sequences=len(pairs)))
    out: dict[str, Any] = {
        "pref_accuracy": m["pref_accuracy"], "logp_accuracy": m["logp_accuracy"], "pref_loss": m["loss"],
        "reward_margin": m["rewards/margins"], "reward_chosen": m["rewards/chosen"],
        "reward_rejected": m["rewards/rejected"], "pref_pairs": m["pairs"]}
    if gain_at is not None:
        ctx, stage, step = gain_at
        scores = [float(x) for t in m["pair_scores"] for x in t.tolist()]  # rank-major, as the pairs were dealt
        # the pairs and how they were dealt to the ranks: a different learner count is other rows
        rows = hashlib.sha256(json.dumps([world, [[p.chosen.input_ids, p.rejected.input_ids] for p in pairs]]).encode())
        gain = scores_gain(ctx, rows.hexdigest(), scores, f"{stage}-pref", step)
        if gain:
            out["pref_gain"] = gain
    return out
