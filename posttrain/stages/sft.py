"""The `sft` stage: supervised fine-tuning on completion / assistant tokens only.

Loop: load data -> tokenize -> (pack) -> (resume) -> for each optimizer step: pick the
step's examples, shard them over learner ranks into micro-batches, one learner step with
the SFT objective (token-mean NLL over the whole step) -> log -> periodic eval and
resumable state -> final eval, checkpoint and manifest.

Long context (`data.pack: true`): the tokenised examples are packed once (best-fit
decreasing, deterministic) into rows of at most `data.max_seq_len` tokens; a step then
samples `batch.global_size` rows and each micro-batch is one row [1, T] with cu_seqlens, so
documents never see each other and positions restart per document. The normaliser is still
the number of target tokens of the whole step. Eval rows with `length`/`depth` metadata
(the needle task) get retrieval accuracy per cell and a heatmap (posttrain.evals).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

from posttrain.cluster import ClusterConfig
from posttrain.data import Batch, DataConfig, Example, PackedRow, collate, collate_packed, encode_sft, pack
from posttrain.data.collate import IGNORE_INDEX
from posttrain.evals import held_out_eval
from posttrain.learner import Learners
from posttrain.objectives import SFTObjective, StepCounts
from posttrain.progress import stage_progress
from posttrain.stages.common import (
    BatchConfig, StageConfig, StageContext, also_evals, batch_indices, check_finite, end_of_step, finish_stage,
    load_split, micro_batches, resolve_data_paths, resume_step,
)


@dataclass(frozen=True, kw_only=True)
class SFTStageConfig(StageConfig):
    """Supervised fine-tuning (short- or long-context): the common stage fields plus `batch`."""

    kind: Literal["sft"] = "sft"
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.data
        if d.format not in ("prompt_completion", "chat"):
            raise ValueError(f"data.format: an sft stage reads prompt_completion or chat rows, got {d.format!r}")
        if d.pack and self.batch.micro_size != 1:
            raise ValueError(f"batch.micro_size: must be 1 with data.pack (one packed row of data.max_seq_len "
                             f"tokens per micro-batch), got {self.batch.micro_size}")

    def check_cluster(self, cluster: ClusterConfig) -> None:
        self.batch.check_learners(cluster.learners)


def run_sft(ctx: StageContext, cfg: SFTStageConfig, learners: Learners) -> dict[str, Any]:
    train_path, eval_path = resolve_data_paths(ctx, cfg.data, "sft")
    train_records = load_split(train_path, cfg.data, ctx.console)
    eval_records = load_split(eval_path, cfg.data, ctx.console)
    examples = encode(train_records, ctx.tokenizer, cfg.data) + mix_examples(ctx, cfg)
    units = training_units(examples, cfg.data)  # examples or packed rows
    if cfg.data.pack:
        n_tok = sum(len(r) for r in units)
        ctx.console.print(f"{cfg.name}: packed {len(train_records)} examples into {len(units)} rows "
                          f"({n_tok / (len(units) * cfg.data.max_seq_len):.1%} full)")
    pad_id = ctx.tokenizer.pad_token_id
    world = learners.world_size
    objective = SFTObjective(chunk_size=cfg.learner.loss_chunk_size)

    learners.configure(cfg.optim, cfg.schedule, cfg.learner, cfg.steps, cfg.lora, ctx.init_adapter,
                       profile_dir=str(ctx.profile_dir))
    start = resume_step(ctx, learners, cfg.name)

    def evaluate(step: int) -> dict[str, Any]:
        # exact match; long-context retrieval rows: accuracy per (length, depth) + heatmap
        metrics = held_out_eval(ctx, learners, eval_records, cfg.data.task, cfg.eval, stage=cfg.name, step=step)
        metrics.update(eval_loss(ctx, cfg, learners, objective, eval_records))
        metrics.update(also_evals(ctx, learners, cfg.eval, stage=cfg.name, step=step))
        ctx.logger.log(cfg.name, "eval", step, metrics)
        return metrics

    if start == 0 and eval_records:
        evaluate(0)
    last: dict[str, Any] = {}
    with stage_progress(ctx.console, cfg.name, cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            chosen = [units[i] for i in batch_indices(len(units), cfg.batch.global_size, step, ctx.seed)]
            counts = StepCounts(tokens=sum(n_targets(u) for u in chosen))
            micro = micro_batches(chosen, world, cfg.batch.micro_size, lambda mb: collate_units(mb, pad_id))
            sent = time.perf_counter()
            last = learners.train_step(objective, micro, counts)
            last["time/learner"] = time.perf_counter() - sent  # the learners' round trip; the rest of time/step is here
            check_finite(ctx, cfg.name, step + 1, last)
            bar.advance(loss=last["loss"])
            end_of_step(ctx, cfg, learners, step + 1, last, evaluate)
    final = evaluate(cfg.steps) if eval_records else {}
    return finish_stage(ctx, learners, cfg, final, last)


Unit = Union[Example, PackedRow]


def encode(records: Sequence[Any], tokenizer: Any, data: DataConfig) -> list[Example]:
    """Tokenise with the loss mask; examples with no trained token are dropped.

    Packed with pack_mode "split", long examples are kept whole here and cut by the packer.
    """
    max_len = 2**62 if data.pack and data.pack_mode == "split" else data.max_seq_len
    examples = [encode_sft(r, tokenizer, max_len=max_len) for r in records]
    return [ex for ex in examples if ex.n_trained > 0]


def mix_examples(ctx: StageContext, cfg: SFTStageConfig) -> list[Example]:
    """Tokenised training examples of data.mix's sources (the first max_examples of each),
    encoded with the stage's own max_seq_len / pack_mode; they join the stage's examples
    before packing and sampling."""
    out: list[Example] = []
    for src in cfg.data.mix:
        source = dataclasses.replace(cfg.data, task=src.task, task_args=src.task_args, train=src.train,
                                     eval=None, format=src.format, mix=[])
        path, _ = resolve_data_paths(ctx, source, "sft")
        examples = encode(load_split(path, source, ctx.console)[: src.max_examples], ctx.tokenizer, cfg.data)
        ctx.console.print(f"{cfg.name}: mixing in {len(examples)} examples from {path}")
        out += examples
    return out


def training_units(examples: list[Example], data: DataConfig) -> list[Unit]:
    """What one step samples from: the examples, or packed rows of data.max_seq_len tokens."""
    return pack(examples, data.max_seq_len, mode=data.pack_mode) if data.pack else examples


def n_targets(unit: Unit) -> int:
    """Target tokens of an example or a packed row (the SFT normaliser's share)."""
    if isinstance(unit, PackedRow):
        return int((unit.targets != IGNORE_INDEX).sum())
    return len([t for t in unit.loss_mask[1:] if t])  # position 0 is never a target


def collate_units(units: Sequence[Unit], pad_id: int) -> Batch:
    """One micro-batch: right-padded examples, or one packed row [1, T] (micro_size 1)."""
    return collate_packed(units) if isinstance(units[0], PackedRow) else collate(units, pad_id)


def eval_loss(ctx: StageContext, cfg: SFTStageConfig, learners: Learners, objective: SFTObjective,
              records: list[Any]) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity (evaluated on the first `eval.limit` rows)."""
    import math

    records = records[: cfg.eval.limit] if cfg.eval.limit else records
    units = training_units(encode(records, ctx.tokenizer, cfg.data), cfg.data)
    world = learners.world_size
    units = units[: len(units) - len(units) % world]
    if not units:
        return {}
    counts = StepCounts(tokens=sum(n_targets(u) for u in units))
    pad_id = ctx.tokenizer.pad_token_id
    m = learners.evaluate(objective, micro_batches(units, world, cfg.batch.micro_size,
                                                   lambda mb: collate_units(mb, pad_id)), counts)
    return {"loss": m["loss"], "perplexity": math.exp(min(m["loss"], 50.0))}
