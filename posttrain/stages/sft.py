"""The `sft` stage: supervised fine-tuning on completion / assistant tokens only.

Loop: load data -> tokenize -> (resume) -> for each optimizer step: pick the step's
examples, shard them over learner ranks into micro-batches, one learner step with the SFT
objective (token-mean NLL over the whole step) -> log -> periodic eval and resumable state
-> final eval, checkpoint and manifest.
"""
from __future__ import annotations

from typing import Any

from posttrain.config import SFTStageConfig
from posttrain.data import collate, encode_sft
from posttrain.objectives import sft_objective
from posttrain.progress import stage_progress
from posttrain.stages.common import (
    StageContext, batch_indices, exact_match_eval, finish_stage, latest_state, load_split,
    resolve_data_paths, save_state, shard,
)


def run_sft(ctx: StageContext, cfg: SFTStageConfig, learners: Any) -> dict[str, Any]:
    train_path, eval_path = resolve_data_paths(ctx, cfg.data, "sft")
    train_records = load_split(train_path, cfg.data, ctx.console)
    eval_records = load_split(eval_path, cfg.data, ctx.console)
    examples = [encode_sft(r, ctx.tokenizer, max_len=cfg.data.max_seq_len) for r in train_records]
    examples = [ex for ex in examples if ex.n_trained > 0]
    pad_id = ctx.tokenizer.pad_token_id
    world = learners.world_size
    if cfg.batch.global_size % (cfg.batch.micro_size * world):
        raise ValueError(f"{cfg.name}: batch.global_size {cfg.batch.global_size} must be a multiple of "
                         f"micro_size x learners = {cfg.batch.micro_size * world}")

    learners.configure(cfg.optim, cfg.schedule, cfg.learner, cfg.steps)
    start = 0
    state = latest_state(ctx)
    if state is not None:
        start = learners.load_state(str(state))["step"]
        ctx.console.print(f"[cyan]{cfg.name}: resuming from step {start} ({state})[/cyan]")
    ctx.logger.truncate(cfg.name, start + 1)

    def evaluate(step: int) -> dict[str, Any]:
        metrics = exact_match_eval(ctx, learners, eval_records, cfg.data.task, cfg.eval)
        metrics.update(eval_loss(ctx, cfg, learners, eval_records))
        ctx.logger.log(cfg.name, "eval", step, metrics)
        return metrics

    if start == 0 and eval_records:
        evaluate(0)
    last: dict[str, Any] = {}
    with stage_progress(ctx.console, cfg.name, cfg.steps, start) as bar:
        for step in range(start, cfg.steps):
            chosen = [examples[i] for i in batch_indices(len(examples), cfg.batch.global_size, step, ctx.seed)]
            num_tokens = sum(ex.n_trained for ex in chosen)
            micro = [[collate(mb, pad_id) for mb in rank] for rank in shard(chosen, world, cfg.batch.micro_size)]
            last = learners.train_step(sft_objective, micro, num_tokens=num_tokens,
                                       chunk_size=cfg.learner.loss_chunk_size)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                ctx.logger.log(cfg.name, "train", step + 1, last)
            bar.advance(loss=last["loss"])
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                evaluate(step + 1)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.steps:
                save_state(ctx, learners, step + 1, cfg.checkpoint)
    final = evaluate(cfg.steps) if eval_records else {}
    return finish_stage(ctx, learners, "sft", cfg.name, cfg, final, last)


def eval_loss(ctx: StageContext, cfg: SFTStageConfig, learners: Any, records: list[Any]) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity (evaluated on the first `eval.limit` rows)."""
    import math

    records = records[: cfg.eval.limit] if cfg.eval.limit else records
    examples = [ex for ex in (encode_sft(r, ctx.tokenizer, max_len=cfg.data.max_seq_len) for r in records)
                if ex.n_trained > 0]
    if not examples:
        return {}
    world = learners.world_size
    usable = len(examples) - len(examples) % world
    examples = examples[:usable]
    num_tokens = sum(ex.n_trained for ex in examples)
    micro = [[collate(mb, ctx.tokenizer.pad_token_id) for mb in rank]
             for rank in shard(examples, world, cfg.batch.micro_size)]
    m = learners.evaluate(sft_objective, micro, num_tokens=num_tokens, chunk_size=cfg.learner.loss_chunk_size)
    return {"loss": m["loss"], "perplexity": math.exp(min(m["loss"], 50.0))}
