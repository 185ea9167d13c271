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
from typing import Any, Sequence, Union

from posttrain.config import DataConfig, SFTStageConfig
from posttrain.data import Batch, Example, PackedRow, collate, collate_packed, encode_sft, pack
from posttrain.data.collate import IGNORE_INDEX
from posttrain.evals import held_out_eval
from posttrain.objectives import sft_objective
from posttrain.progress import stage_progress
from posttrain.stages.common import (
    StageContext, batch_indices, end_of_step, finish_stage, resume_step, load_split,
    resolve_data_paths, shard,
)


def run_sft(ctx: StageContext, cfg: SFTStageConfig, learners: Any) -> dict[str, Any]:
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
    if cfg.batch.global_size % (cfg.batch.micro_size * world):
        raise ValueError(f"{cfg.name}: batch.global_size {cfg.batch.global_size} must be a multiple of "
                         f"micro_size x learners = {cfg.batch.micro_size * world}")

    learners.configure(cfg.optim, cfg.schedule, cfg.learner, cfg.steps)
    start = resume_step(ctx, learners, cfg.name)

    def evaluate(step: int) -> dict[str, Any]:
        # exact match; long-context retrieval rows: accuracy per (length, depth) + heatmap
        metrics = held_out_eval(ctx, learners, eval_records, cfg.data.task, cfg.eval, stage=cfg.name, step=step)
        metrics.update(eval_loss(ctx, cfg, learners, eval_records))
        ctx.logger.log(cfg.name, "eval", step, metrics)
        return metrics

    if start == 0 and eval_records:
        evaluate(0)
    last: dict[str, Any] = {}
    with stage_progress(ctx.console, cfg.name, cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            chosen = [units[i] for i in batch_indices(len(units), cfg.batch.global_size, step, ctx.seed)]
            num_tokens = sum(n_targets(u) for u in chosen)
            micro = micro_batches(chosen, world, cfg.batch.micro_size, pad_id)
            last = learners.train_step(sft_objective, micro, num_tokens=num_tokens,
                                       chunk_size=cfg.learner.loss_chunk_size)
            bar.advance(loss=last["loss"])
            end_of_step(ctx, cfg, learners, step + 1, last, evaluate)
    final = evaluate(cfg.steps) if eval_records else {}
    return finish_stage(ctx, learners, "sft", cfg.name, cfg, final, last)


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


def micro_batches(units: Sequence[Unit], world: int, micro_size: int, pad_id: int) -> list[list[Batch]]:
    """ranks x micro-batches: right-padded examples, or one packed row [1, T] (micro_size 1)."""
    return [[collate_packed(mb) if isinstance(mb[0], PackedRow) else collate(mb, pad_id) for mb in rank]
            for rank in shard(units, world, micro_size)]


def eval_loss(ctx: StageContext, cfg: SFTStageConfig, learners: Any, records: list[Any]) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity (evaluated on the first `eval.limit` rows)."""
    import math

    records = records[: cfg.eval.limit] if cfg.eval.limit else records
    units = training_units(encode(records, ctx.tokenizer, cfg.data), cfg.data)
    world = learners.world_size
    units = units[: len(units) - len(units) % world]
    if not units:
        return {}
    num_tokens = sum(n_targets(u) for u in units)
    micro = micro_batches(units, world, cfg.batch.micro_size, ctx.tokenizer.pad_token_id)
    m = learners.evaluate(sft_objective, micro, num_tokens=num_tokens, chunk_size=cfg.learner.loss_chunk_size)
    return {"loss": m["loss"], "perplexity": math.exp(min(m["loss"], 50.0))}
