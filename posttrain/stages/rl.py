"""The `rl` stage: online GRPO or CISPO (MiniMax-M1) with rollout workers on Ray.

One step, top to bottom:
  1. sample a prompt batch (deterministic in (seed, step)) and generate G samples per prompt on
     the rollout workers (token ids + engine log-probs + the policy version that sampled them);
  2. rewards (posttrain.rollout.RewardRunner: a raising / hanging reward scores the fallback);
  3. filters: DAPO overlong penalty on the rewards; dynamic sampling drops groups whose rewards
     are all equal and samples extra prompt batches (up to filters.max_extra_rounds) to refill;
  4. group advantages (optionally MiniMax-01's balanced ones); sequences = prompt ids + completion ids exactly as sampled, loss on the
     completion only (truncated completions masked if filters.mask_truncated);
  5. learner: log-probs of the sampling policy ("old", a no-grad pass; with K = 1 none: the
     objective uses the current ones detached and hands them back), optional frozen-reference
     log-probs (KL), K = updates_per_batch mini-batch optimizer steps with the PolicyObjective of
     `loss`, train/inference mismatch metrics;
  6. weight sync (the version increments) -> metrics -> periodic eval and resumable state.

With `async_rollout` (docs/async_rl.md) steps 1-4 of step t + 1 run on a driver thread while
the learner does step 5 of step t, from the weights step t trains from (one step off-policy; the
stage's TIS/MIS correction weighs the lag); the step after a checkpoint is generated from its
own weights, so a resumed run trains on exactly what an uninterrupted one did.

A rollout worker that dies is rebuilt from the init checkpoint and given the current weights and
version: by the weight sync itself when it dies before or during a sync (RolloutGroup.update_weights),
else when a generation meets it, and that generation is retried once
(posttrain.cluster.RolloutWorkerLost).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional

import torch

from posttrain.algorithms import (
    balanced_advantages, dynamic_sampling_mask, group_advantages, mismatch_metrics, overlong_penalty,
    truncation_mask,
)
from posttrain.cluster import ClusterConfig
from posttrain.data import encode_prompt, token_ids
from posttrain.data.collate import IGNORE_INDEX
from posttrain.evals import held_out_eval
from posttrain.learner import Learners, ScheduleConfig
from posttrain.lora import AdapterFreeReference
from posttrain.objectives import CorrectionConfig, GRPOLoss, PolicyLoss, PolicyObjective, RLBatch, StepCounts
from posttrain.progress import stage_progress
from posttrain.rollout import (
    Completion, RewardConfig, RewardRunner, RolloutBatch, RolloutConfig, SamplingConfig, SamplingParams,
)
from posttrain.stages.common import (
    StageConfig, StageContext, also_evals, batch_indices, check_finite, end_of_step, finish_stage, load_split,
    micro_batches, resolve_data_paths, resume_step,
)


@dataclass(frozen=True)
class AdvantageConfig:
    """How rewards become advantages (algorithms.group_advantages / balanced_advantages)."""

    scale: Literal["group", "batch", "none"] = "group"  # divide by the group's / batch's std, or not (Dr. GRPO)
    eps: float = 1e-4  # added to the std
    balanced: bool = False  # MiniMax-01: equal total weight of positive and negative samples, by token count

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps: must be a finite number > 0, got {self.eps}")


@dataclass(frozen=True)
class FilterConfig:
    """DAPO rollout filters."""

    dynamic_sampling: bool = True  # drop groups whose rewards are all equal and refill
    max_extra_rounds: int = 2  # extra prompt batches sampled to refill
    overlong_cache: int = 0  # > 0: soft overlong penalty over the last this-many tokens of max_new_tokens
    overlong_penalty: float = 1.0  # the penalty at the budget's end
    mask_truncated: bool = False  # zero the loss of completions cut by the length budget

    def __post_init__(self) -> None:
        if not self.max_extra_rounds >= 0:
            raise ValueError(f"max_extra_rounds: must be >= 0, got {self.max_extra_rounds}")
        if not self.overlong_cache >= 0:
            raise ValueError(f"overlong_cache: must be >= 0, got {self.overlong_cache}")
        if not (math.isfinite(self.overlong_penalty) and self.overlong_penalty >= 0):
            raise ValueError(f"overlong_penalty: must be a finite number >= 0, got {self.overlong_penalty}")


@dataclass(frozen=True)
class AsyncRolloutConfig:
    """Asynchronous (one-step-off-policy) RL, docs/async_rl.md: the rollout batch of step t + 1 is
    generated, scored and filtered while the learner trains step t, from the weights step t
    trains from. The batch trained at step t was then sampled by the weights of step t - 1: the
    stage's `correction` (TIS/MIS) weighs the engine's log-probs against the learner's current
    ones. The step after a checkpoint (checkpoint.every) is generated from that step's own
    weights, so a resumed run regenerates exactly what an uninterrupted one trained on."""

    # 1: one step off (the batch of step t sampled by the weights of step t - 1 at the oldest);
    # 0: no overlap, the synchronous loop's results through the asynchronous path
    max_staleness: int = 1

    def __post_init__(self) -> None:
        if self.max_staleness not in (0, 1) or isinstance(self.max_staleness, bool):
            raise ValueError(f"max_staleness: must be 0 or 1 (one step off; deeper pipelines are not "
                             f"implemented), got {self.max_staleness}")


@dataclass(frozen=True, kw_only=True)
class RLStageConfig(StageConfig):
    """Online RL (GRPO / CISPO / a custom loss). One step = one rollout batch of
    prompts_per_step x sampling.n completions -> `updates_per_batch` optimizer steps (the batch
    split into that many mini-batches) -> one weight sync."""

    kind: Literal["rl"] = "rl"
    prompts_per_step: int = 16  # prompts of one rollout batch (before filters)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # n is GRPO's group size
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the engine of the rollout workers
    loss: PolicyLoss = field(default_factory=GRPOLoss)
    correction: Optional[CorrectionConfig] = None  # TIS/MIS weight for the engine-vs-learner mismatch; null: off
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    updates_per_batch: int = 1  # optimizer steps per rollout batch (> 1: off-policy, old log-probs kept)
    micro_size: int = 32  # sequences per learner micro-batch
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="constant"))
    # generate step t + 1 while the learner trains step t (needs `correction`); null: synchronous
    async_rollout: Optional[AsyncRolloutConfig] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        s, d = self.sampling, self.data
        checks = [
            (self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}"),
            (s.n >= 2, "sampling.n", f"must be >= 2 (group advantages need 2 samples), got {s.n}"),
            (s.temperature > 0, "sampling.temperature", f"must be > 0 for RL sampling, got {s.temperature}"),
            (self.updates_per_batch >= 1, "updates_per_batch", f"must be >= 1, got {self.updates_per_batch}"),
            (self.micro_size >= 1, "micro_size", f"must be >= 1, got {self.micro_size}"),
            (self.filters.overlong_cache <= s.max_new_tokens, "filters.overlong_cache",
             f"must be in [0, sampling.max_new_tokens={s.max_new_tokens}], got {self.filters.overlong_cache}"),
            (d.format == "rl", "data.format", f"must be 'rl' for an rl stage, got {d.format!r}"),
            (not d.pack, "data.pack", "only sft and dpo stages pack their data"),
            (not d.mix, "data.mix", "only sft stages mix data sources"),
            (self.correction is not None or self.async_rollout is None or self.async_rollout.max_staleness == 0,
             "correction", "async_rollout trains on samples of the previous step's weights: set a correction "
             "(e.g. {mode: tis}) to weigh them by the IS ratio"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")

    @property
    def optimizer_steps(self) -> int:
        return self.steps * self.updates_per_batch

    def check_cluster(self, cluster: ClusterConfig) -> None:
        if self.async_rollout is not None and cluster.use_gpus and cluster.placement == "colocated":
            raise ValueError("async_rollout: needs cluster.placement split on GPUs (colocated workers share the "
                             "learner's GPU, where generation cannot overlap training)")


@dataclass(frozen=True)
class Sample:
    """One completion ready for the learner: its prompt ids, the engine's output, its scores."""

    prompt_ids: list[int]
    completion: Completion
    reward: float  # shaped (overlong penalty included); raw reward in `score`
    score: float
    advantage: float = 0.0


def run_rl(ctx: StageContext, cfg: RLStageConfig, learners: Learners) -> dict[str, Any]:
    from posttrain.cluster import RolloutGroup
    from posttrain.weight_sync import make_weight_sync

    train_path, eval_path = resolve_data_paths(ctx, cfg.data, "rl")
    train_records = load_split(train_path, cfg.data, ctx.console)
    eval_records = load_split(eval_path, cfg.data, ctx.console)
    prompts = [encode_prompt(r, ctx.tokenizer) for r in train_records]
    rewards = RewardRunner(cfg.reward)
    objective = PolicyObjective(cfg.loss, cfg.sampling, cfg.correction, chunk_size=cfg.learner.loss_chunk_size)

    learners.configure(cfg.optim, cfg.schedule, cfg.learner, cfg.optimizer_steps, cfg.lora,
                       ctx.init_adapter, profile_dir=str(ctx.profile_dir))
    start = resume_step(ctx, learners, cfg.name)

    ids = token_ids(ctx.tokenizer)
    rollouts = RolloutGroup(ctx.cluster, cfg.rollout, ctx.model, ctx.init_path, token_ids=ids,
                            placement=ctx.placement)
    sync = make_weight_sync(ctx.cluster, ctx.placement, learners, rollouts, bucket_mb=cfg.rollout.weight_bucket_mb,
                            version=start)
    # Workers load the init checkpoint; after a resume (or from a fresh preset) the learner holds
    # other weights, so the first push is unconditional.
    sync.push(start)
    reference = reference_policy(ctx, cfg, ids, learners)

    def generate(prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        return generate_with_recovery(rollouts, sync, prompt_ids, params, ctx.console)

    def evaluate(step: int) -> dict[str, Any]:
        metrics = held_out_eval(ctx, learners, eval_records, cfg.data.task, cfg.eval, stage=cfg.name, step=step)
        metrics.update(also_evals(ctx, learners, cfg.eval, stage=cfg.name, step=step))
        ctx.logger.log(cfg.name, "eval", step, metrics)
        return metrics

    # async_rollout: at most one batch is collected ahead, on this one thread, while the learner
    # trains; nothing else uses the rollout workers (nor pushes weights) until it is collected.
    ahead = steps_ahead(ctx, cfg)
    pool = ThreadPoolExecutor(1, thread_name_prefix="rollout") if cfg.async_rollout is not None else None

    def launch(step: int, overlapped: bool) -> "Future[tuple[list[Sample], dict[str, float]]]":
        """Collect step `step`'s batch with the weights the workers hold now, on the pool's thread
        (async) or here. An overlapped one may not re-sync lost workers itself (the learner is
        mid-update): RolloutWorkerLost reaches `collect`, which does."""
        def job() -> tuple[list[Sample], dict[str, float]]:
            timer = PhaseTimer()
            samples, m = collect_samples(ctx, cfg, step, prompts, train_records,
                                         rollouts.generate if overlapped else generate, rewards, timer)
            extra = {"async/generated_ahead": float(overlapped)} if pool is not None else {}
            return samples, {**m, **timer.metrics(), **extra}
        if pool is not None:
            return pool.submit(job)
        done: Future = Future()
        done.set_result(job())
        return done

    def collect(pending: Future, step: int) -> tuple[list[Sample], dict[str, float]]:
        from posttrain.cluster import RolloutWorkerLost

        try:
            samples, metrics = pending.result()
        except RolloutWorkerLost as lost:  # during an overlapped generation: regenerate from this step's weights
            ctx.console.print(f"[yellow]{lost}; pushing version {step} and generating step {step + 1} "
                              f"again[/yellow]")
            sync.push(step, workers=lost.replaced)
            sync.push(step)
            samples, metrics = launch(step, overlapped=False).result()
        if cfg.async_rollout is not None and metrics["staleness"] > cfg.async_rollout.max_staleness:
            raise RuntimeError(f"{cfg.name}: step {step + 1} sampled {metrics['staleness']:.0f} steps stale, over "
                               f"async_rollout.max_staleness {cfg.async_rollout.max_staleness}")
        return samples, metrics

    last: dict[str, Any] = {}
    pending: Optional[Future] = None
    try:
        if start == 0 and eval_records:
            evaluate(0)
        ctx.step_clock = time.perf_counter()  # step 1's time/step without the workers' start and eval 0
        with stage_progress(ctx.console, cfg.name, cfg.steps, start) as bar:
            for step in range(start, cfg.steps):
                timer = PhaseTimer()
                if pending is None:  # nothing generated ahead: generate now, from this step's weights
                    pending = launch(step, overlapped=False)
                with timer("wait_rollout"):
                    samples, metrics = collect(pending, step)
                pending = None
                if ahead and generate_ahead(cfg, step + 1):
                    with timer("sync"):  # the weights this step trains from sample the next batch
                        if sync.version < step:
                            metrics.update(sync.push(step))
                    pending = launch(step + 1, overlapped=True)
                if samples:
                    with timer("learner"):
                        metrics.update(learn(ctx, cfg, learners, reference, samples, objective, step))
                else:  # every group had equal rewards in every round: nothing to learn from
                    ctx.console.print(f"[yellow]{cfg.name}: step {step + 1}: no informative group, no update[/yellow]")
                if pending is None and (samples or pool is not None):
                    with timer("sync"):
                        metrics.update(sync.push(step + 1))
                last = {**metrics, **timer.metrics(), "policy_version": float(sync.version)}
                bar.advance(reward=last["reward/mean"], acc=last["accuracy"])
                end_of_step(ctx, cfg, learners, step + 1, last, evaluate)
        final = evaluate(cfg.steps) if eval_records else {}
    finally:
        rollouts.shutdown()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if reference is not None:
            reference.shutdown()
    return finish_stage(ctx, learners, cfg, final, last)


def steps_ahead(ctx: StageContext, cfg: RLStageConfig) -> int:
    """How many batches are generated ahead of the learner: async_rollout.max_staleness, except
    colocated on GPUs (use_gpus auto-detected; set explicitly it is a load-time error), where
    the workers share the learner's GPU: there the stage says so and runs without overlap."""
    a = cfg.async_rollout
    if a is None or a.max_staleness == 0:
        return 0
    p = ctx.placement
    if p is not None and p.gpus and p.mode == "colocated":
        ctx.console.print(f"[yellow]{cfg.name}: async_rollout: colocated workers share the learners' GPUs, where "
                          f"generation cannot overlap training: running without overlap (use cluster.placement "
                          f"split)[/yellow]")
        return 0
    return a.max_staleness


def generate_ahead(cfg: RLStageConfig, step: int) -> bool:
    """Whether step `step`'s batch is generated during the step before it. Not the first step after
    a checkpoint: a run resumed there holds only that step's weights, so both runs sample it
    from them (one step per checkpoint interval without overlap keeps resume exact)."""
    every = cfg.checkpoint.every
    return step < cfg.steps and not (every and step % every == 0)


# ------------------------------------------------------------------------------ phases
def generate_with_recovery(rollouts: Any, sync: Any, prompt_ids: list[list[int]], params: SamplingParams,
                           console: Any) -> RolloutBatch:
    """rollouts.generate; if workers died, they were rebuilt from the init checkpoint: push
    them the current weights and version (nothing trained is lost), then retry once."""
    from posttrain.cluster import RolloutWorkerLost

    try:
        return rollouts.generate(prompt_ids, params)
    except RolloutWorkerLost as lost:
        console.print(f"[yellow]{lost}; re-syncing version {sync.version} and retrying[/yellow]")
        sync.push(sync.version, workers=lost.replaced)
        return rollouts.generate(prompt_ids, params)


class PhaseTimer:
    """Wall-clock seconds per phase of one step (time/generate, time/reward, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def sampling_seed(seed: int, step: int, round_: int) -> int:
    """Sampling seed of (stage seed, step, refill round): a resumed run samples what an
    uninterrupted one would have."""
    return (seed * 1_000_003 + step * 10_007 + round_ * 101 + 17) % (2**62)


def collect_samples(ctx: StageContext, cfg: RLStageConfig, step: int, prompts: list[list[int]],
                    records: list[Any], generate: Callable[[list[list[int]], SamplingParams], RolloutBatch],
                    rewards: RewardRunner,
                    timer: PhaseTimer) -> tuple[list[Sample], dict[str, float]]:
    """Generate, score and filter until `prompts_per_step` informative groups are kept (or the
    extra rounds run out). Reward/accuracy metrics describe the first round (an unbiased draw
    of the current policy); filter metrics describe all rounds. `staleness`: steps between this
    step and the oldest policy version that sampled it; `sampled_tokens`: completion tokens of
    every round."""
    flt = cfg.filters
    want = cfg.prompts_per_step
    rounds = 1 + (flt.max_extra_rounds if flt.dynamic_sampling else 0)
    kept: list[list[Sample]] = []
    metrics: dict[str, float] = {}
    seen, sampled, oldest = 0, 0, step
    for rnd in range(rounds):
        # Round r of step t reads the prompt slice of "virtual step" t * rounds + r.
        idx = batch_indices(len(prompts), want, step * rounds + rnd, ctx.seed)
        params = SamplingParams.of(cfg.sampling, stop_token_ids=(ctx.tokenizer.eos_token_id,),
                                   seed=sampling_seed(ctx.seed, step, rnd))
        with timer("generate"):
            batch = generate([prompts[i] for i in idx], params)
        sampled += sum(len(c.token_ids) for c in batch.completions)
        oldest = min(oldest, batch.policy_version)
        with timer("reward"):
            groups, m = score_groups(ctx, cfg, batch.completions, [prompts[i] for i in idx],
                                     [records[i].answer for i in idx], rewards)
        if rnd == 0:
            metrics.update(m)
            metrics.update({k: v for k, v in batch.metrics.items() if not k.endswith("seconds")})
        seen += len(groups)
        informative = dynamic_sampling_mask(torch.tensor([x.reward for g in groups for x in g]),
                                            cfg.sampling.n).tolist() if flt.dynamic_sampling else [True] * len(groups)
        kept += [g for g, ok in zip(groups, informative) if ok]
        if len(kept) >= want:
            break
    kept = kept[:want]
    metrics.update({"filter/rounds": float(rnd + 1), "filter/kept_groups": float(len(kept)),
                    "filter/kept_frac_of_sampled": len(kept) / max(seen, 1),
                    "staleness": float(step - oldest), "sampled_tokens": float(sampled)})
    return [x for g in with_advantages(kept, cfg) for x in g], metrics


def score_groups(ctx: StageContext, cfg: RLStageConfig, completions: list[Completion], prompt_ids: list[list[int]],
                 answers: list[str], rewards: RewardRunner) -> tuple[list[list[Sample]], dict[str, float]]:
    """Reward every completion (+ DAPO overlong penalty); group them by prompt."""
    texts = [ctx.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    refs = [answers[c.prompt_index] for c in completions]
    scores, m = rewards.score(texts, refs)
    shaped = torch.tensor(scores, dtype=torch.float32)
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    flt = cfg.filters
    if flt.overlong_cache:
        shaped = shaped + overlong_penalty(lengths, cfg.sampling.max_new_tokens, flt.overlong_cache,
                                           flt.overlong_penalty)
    samples = [Sample(prompt_ids[c.prompt_index], c, float(r), sc) for c, r, sc in zip(completions, shaped.tolist(), scores)]
    G = cfg.sampling.n
    groups = [samples[i:i + G] for i in range(0, len(samples), G)]
    sc = torch.tensor(scores, dtype=torch.float32)
    metrics = {
        "reward/mean": float(shaped.mean()), "reward/std": float(shaped.std()) if len(scores) > 1 else 0.0,
        "reward/raw_mean": float(sc.mean()), "accuracy": float((sc == 1.0).float().mean()),
        "response_length": float(lengths.mean()), "response_length_max": float(lengths.max()),
        "reward/errors": m["reward/errors"], "reward/timeouts": m["reward/timeouts"],
    }
    return groups, metrics


def with_advantages(groups: list[list[Sample]], cfg: RLStageConfig) -> list[list[Sample]]:
    if not groups:
        return groups
    G, a = cfg.sampling.n, cfg.advantages
    flat = [x for g in groups for x in g]
    adv = group_advantages(torch.tensor([x.reward for x in flat]), G, scale=a.scale, eps=a.eps)
    if a.balanced:
        adv = balanced_advantages(adv, G, lengths=torch.tensor([len(x.completion.token_ids) for x in flat]))
    flat = [dataclasses.replace(x, advantage=v) for x, v in zip(flat, adv.tolist())]
    return [flat[i:i + G] for i in range(0, len(flat), G)]


# ------------------------------------------------------------------------------ learner
def to_rl_batch(samples: list[Sample], pad_id: int, mask_truncated: bool) -> RLBatch:
    """Right-padded RLBatch of prompt + completion ids; targets are the completion tokens only
    and rollout_logprobs sit at the same positions (position t scores token t + 1)."""
    width = max(len(x.prompt_ids) + len(x.completion.token_ids) for x in samples)
    B = len(samples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    rollout_lp = torch.zeros((B, width), dtype=torch.float32)
    for b, x in enumerate(samples):
        p, c = len(x.prompt_ids), x.completion
        input_ids[b, :p + len(c.token_ids)] = torch.tensor(x.prompt_ids + list(c.token_ids))
        attention[b, :p + len(c.token_ids)] = 1
        targets[b, p - 1:p - 1 + len(c.token_ids)] = torch.tensor(c.token_ids)
        rollout_lp[b, p - 1:p - 1 + len(c.token_ids)] = torch.tensor(c.logprobs, dtype=torch.float32)
    if mask_truncated:
        keep = truncation_mask([x.completion.finish_reason for x in samples], targets != IGNORE_INDEX)
        targets = torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX))
        rollout_lp = rollout_lp * keep
    positions = torch.arange(width).unsqueeze(0).expand(B, width).contiguous()
    return RLBatch(input_ids, targets, positions, attention,
                   torch.tensor([x.advantage for x in samples], dtype=torch.float32), rollout_lp)


def learn(ctx: StageContext, cfg: RLStageConfig, learners: Learners, reference: Any,
          samples: list[Sample], objective: PolicyObjective, step: int) -> dict[str, float]:
    """Old (and reference) log-probs, then K mini-batch optimizer steps, and the mismatch metrics
    of the learner's old log-probs against the engine's. Returns learner metrics averaged over
    the K updates plus the mismatch metrics.

    K == 1: no pass for the old log-probs; the one update's forward is the sampling policy's
    (its log-probs, detached, are the objective's old ones), and the learner hands its per-token
    log-probs back ("old_logprobs", every rank's micro-batches in `flat` order) for the metrics."""
    world, K = learners.world_size, cfg.updates_per_batch
    order = list(range(len(samples)))
    random.Random(sampling_seed(ctx.seed, step, 999)).shuffle(order)  # mix prompts across mini-batches
    minis = [[samples[i] for i in order[k::K]] for k in range(K)]
    minis = [m[: len(m) - len(m) % world] for m in minis]  # ranks need equal shares (drops < world)
    # Within a mini-batch (one optimizer step) the order only sets the micro-batches: a prompt's
    # samples side by side share one prefix forward on the learner (PolicyObjective).
    minis = [by_prompt(m) for m in minis]
    pad = ctx.tokenizer.pad_token_id
    plans = [micro_batches(m, world, cfg.micro_size, lambda mb: to_rl_batch(mb, pad, cfg.filters.mask_truncated))
             for m in minis if m]
    flat = [b for plan in plans for rank in plan for b in rank]
    # K == 1: the objective uses the current log-probs detached (and hands them back)
    old = learners.call_rank0(objective.logprobs, flat) if K > 1 else [None] * len(flat)
    ref = reference.call_rank0(objective.logprobs, flat) if reference is not None else [None] * len(flat)
    for b, o, r in zip(flat, old, ref):
        b.old_logprobs = o
        b.ref_logprobs = r
    # the learner's old log-probs at each batch's completion tokens (b.mask), in `flat` order
    old_tokens = [o[b.mask.bool()] for b, o in zip(flat, old)] if K > 1 else [torch.zeros(0) for _ in flat]
    per_update: list[dict[str, float]] = []
    for plan in plans:
        batches = [b for rank in plan for b in rank]
        # Global normalisers of this optimizer step (all micro-batches, all ranks).
        counts = StepCounts(tokens=float(sum(b.mask.sum() for b in batches)),
                            sequences=float(sum(len(b.advantages) for b in batches)))
        if counts.tokens == 0:  # every completion masked (e.g. all truncated)
            continue
        m = learners.train_step(objective, plan, counts)
        if K == 1:  # one plan: its batches are all of `flat`, in the same order
            old_tokens = m.pop("old_logprobs")
        check_finite(ctx, cfg.name, step + 1, m)  # before a weight sync spreads corrupt weights
        per_update.append(m)
    out = train_mismatch(flat, old_tokens)
    for k in sorted({k for m in per_update for k in m}):
        vals = [m[k] for m in per_update if k in m]
        out[k] = sum(vals) / len(vals)
    out["updates"] = float(len(per_update))
    return out


def by_prompt(samples: list[Sample]) -> list[Sample]:
    """The samples with each prompt's side by side, prompts in order of first appearance (stable)."""
    first: dict[tuple[int, ...], int] = {}
    for x in samples:
        first.setdefault(tuple(x.prompt_ids), len(first))
    return sorted(samples, key=lambda x: first[tuple(x.prompt_ids)])


def train_mismatch(batches: list[RLBatch], learner_logprobs: list[torch.Tensor]) -> dict[str, float]:
    """algorithms.mismatch_metrics over every completion token of the step: learner log-probs
    of the sampling policy vs the engine's own (mean |diff|, prob correlation, IS-ratio range).
    `learner_logprobs`: each batch's at its completion tokens (`lp[b.mask.bool()]`, 1-D)."""
    lrn = torch.cat([lp.float().cpu() for lp in learner_logprobs])
    eng = torch.cat([b.rollout_logprobs[b.mask.bool()] for b in batches])
    m = mismatch_metrics(lrn[None], eng[None], torch.ones_like(lrn)[None])
    return {f"mismatch/{k}": float(v) for k, v in m.items()}


def reference_policy(ctx: StageContext, cfg: RLStageConfig, ids: dict[str, Any], learners: Learners) -> Any:
    """A frozen copy of the stage's init policy when the loss needs one (a KL term), or None.

    A one-rank LearnerGroup of its own (never configured, so it has no optimizer); its
    log-probs come from the objective's `logprobs` like the learner's old log-probs. With LoRA,
    no second model: the learners' own weights with the adapters disabled (the base the
    adapter trains on; with lora.continue_adapter that is the base under the continued one)."""
    if not cfg.loss.needs_reference:
        return None
    if cfg.lora is not None:
        return AdapterFreeReference(learners)
    from posttrain.cluster import LearnerGroup

    cluster = dataclasses.replace(ctx.cluster, learners=1)
    return LearnerGroup(cluster, ctx.model.with_overrides(cfg.model_overrides), ctx.init_path, token_ids=ids,
                        seed=ctx.run_seed, placement=ctx.placement, role="reference")
