"""Does the loss optimise what it should? A few steps on a toy policy, on the CPU, in seconds.

Policy losses: the toy hybrid samples G completions per prompt of a toy task with the native
engine; rewards, group advantages and the micro-batch are built by the rl stage's own code
(rl_batch_from_samples); the loss is called as the learner calls it (global normalisers,
router aux loss weighted by the token share), one AdamW step per batch. Preference losses: a
few steps on fixed (chosen, rejected) pairs with the reference log-probs of the initial policy.
Both run in train mode, one thread, from a fixed seed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from posttrain.algorithms.custom import call_policy_loss, call_preference_loss
from posttrain.testing.batches import rl_batch_from_samples
from posttrain.testing.report import CheckReport
from posttrain.testing.toys import (
    ToyTask, char_tokenizer, digit_task, one_thread, policy_logprobs, preference_pairs, response_ids,
    sequence_rows, toy_hybrid,
)

LossFn = Callable[..., Any]


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    if loss.requires_grad:  # no graph at all (a detached loss on a dense model): nothing to step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


@dataclass(frozen=True)
class ToyRun:
    """A toy RL run: the mean reward of each step's training samples (before that step's
    update), and of a larger evaluation sample (same sampling seed) before and after training."""

    step_rewards: list[float]
    before: float
    after: float


def _mean_reward(model: nn.Module, tok: Any, prompts: list[list[int]], task: ToyTask, n: int, seed: int) -> float:
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.native import NativeEngine

    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=task.max_new_tokens,
                            stop_token_ids=(tok.eos_token_id,), seed=seed)
    outs = NativeEngine(model, num_slots=len(prompts) * n).generate(prompts, params)
    model.train()  # the engine switched it to eval mode
    return sum(task.reward(tok.decode(c.token_ids, skip_special_tokens=True)) for c in outs) / len(outs)


def train_policy(fn: LossFn, args: Optional[dict[str, Any]] = None, *, task: Optional[ToyTask] = None,
                 steps: int = 10, seed: int = 0, group_size: int = 8, lr: float = 3e-3,
                 updates_per_batch: int = 1, reference: bool = False, eval_samples: int = 32) -> ToyRun:
    """Online RL on the toy hybrid with loss ``fn``. ``updates_per_batch > 1`` recomputes the
    sampling policy's log-probs and takes that many steps per batch (off-policy ratios, as the
    stage's K); ``reference`` passes the initial policy's log-probs as ``ref_logprobs`` (for a
    KL term). Before and after training, ``eval_samples`` per prompt measure the mean reward
    (a step's own 64 samples are too few to see a rate of 10% halve)."""
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.native import NativeEngine

    task = task if task is not None else digit_task()
    tok = char_tokenizer()
    with one_thread():
        model = toy_hybrid(seed, tok)
        ref_model = copy.deepcopy(model).eval() if reference else None
        prompts = task.encode(tok)
        before = _mean_reward(model, tok, prompts, task, eval_samples, seed * 1000 + 999)
        opt = _optimizer(model, lr)
        means = []
        for step in range(steps):
            params = SamplingParams(n=group_size, temperature=1.0, max_new_tokens=task.max_new_tokens,
                                    stop_token_ids=(tok.eos_token_id,), seed=seed * 1000 + step)
            outs = NativeEngine(model, num_slots=len(prompts) * group_size).generate(prompts, params)
            model.train()
            rewards = [task.reward(tok.decode(c.token_ids, skip_special_tokens=True)) for c in outs]
            means.append(sum(rewards) / len(rewards))
            b = rl_batch_from_samples(prompts, outs, rewards, group_size, pad_token_id=tok.pad_token_id)
            rows = (b.input_ids, b.targets, b.attention_mask)
            mask = b.mask
            n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
            with torch.no_grad():
                old = policy_logprobs(model, *rows)[0] if updates_per_batch > 1 else None
                ref = policy_logprobs(ref_model, *rows)[0] if ref_model is not None else None
            for _ in range(updates_per_batch):
                logp, aux = policy_logprobs(model, *rows)
                loss, _ = call_policy_loss(fn, logp, logp.detach() if old is None else old, b.advantages, mask,
                                           num_tokens=n_tok, num_sequences=n_seq, ref_logprobs=ref, args=args)
                _step(model, opt, loss + aux * (mask.sum() / n_tok))
        after = _mean_reward(model, tok, prompts, task, eval_samples, seed * 1000 + 999)
    return ToyRun(means, before, after)


def check_policy_optimises(fn: LossFn, args: Optional[dict[str, Any]] = None, *, negate: bool = False,
                           steps: int = 10, seed: int = 0, task: Optional[ToyTask] = None,
                           min_rise: float = 0.2, reference: bool = False) -> CheckReport:
    """The loss optimises its reward: ``steps`` steps on the toy task raise the mean sampled
    reward by at least ``min_rise``; with ``negate`` the policy is trained on the negated reward
    and the original reward must fall to at most half its start."""
    task = task if task is not None else digit_task()
    trained = task.negated() if negate else task
    run = train_policy(fn, args, task=trained, steps=steps, seed=seed, reference=reference)
    sign = -1.0 if negate else 1.0
    before, after = sign * run.before, sign * run.after
    trace = " ".join(f"{sign * m + 0.0:.2f}" for m in run.step_rewards)  # + 0.0: no "-0.00"
    what = f"mean reward '{task.name}' {before:.3f} -> {after:.3f} after {steps} steps (per step: {trace})"
    if negate:
        name, fall, tol = "negated reward lowers it", before - after, before / 2
        ok = fall >= tol and before > 0
        detail = f"{name}: {what}: fall {fall:.3f} {'>=' if ok else '<'} {tol:.3f} (half the start)"
        return CheckReport(name, ok, fall, tol, detail).raise_if_failed()
    name, rise = "optimises its reward", after - before
    ok = rise >= min_rise
    detail = f"{name}: {what}: rise {rise:+.3f} {'>=' if ok else '<'} {min_rise}"
    return CheckReport(name, ok, rise, min_rise, detail).raise_if_failed()


def train_preference(fn: LossFn, args: Optional[dict[str, Any]] = None, *, steps: int = 6, seed: int = 0,
                     lr: float = 3e-3, policy: Callable[..., nn.Module] = toy_hybrid) -> list[float]:
    """Offline preference training on the fixed toy pairs with loss ``fn``; the mean margin
    ``(chosen - ref_chosen) - (rejected - ref_rejected)`` in nats (sequence log-probs) before
    each step and after the last (``steps + 1`` values; the first is 0)."""
    from posttrain.data import encode_prompt

    tok = char_tokenizer()
    pairs = preference_pairs()
    B = len(pairs)
    with one_thread():
        model = policy(seed, tok)
        prompts = [encode_prompt(p, tok) for p, _, _ in pairs]
        responses = [response_ids(c, tok) for _, c, _ in pairs] + [response_ids(r, tok) for _, _, r in pairs]
        rows = sequence_rows(prompts + prompts, responses, tok.pad_token_id)  # chosen rows, then rejected
        lengths = (rows[1] >= 0).float().sum(-1)  # [2B]
        with torch.no_grad():
            ref = policy_logprobs(model, *rows)[0].sum(-1)  # [2B]
        opt = _optimizer(model, lr)
        margins = []
        for step in range(steps + 1):
            logp, aux = policy_logprobs(model, *rows)
            seq = logp.sum(-1)  # [2B]
            margins.append(float(((seq[:B] - ref[:B]) - (seq[B:] - ref[B:])).detach().mean()))
            if step == steps:
                break
            loss, _ = call_preference_loss(fn, seq[:B], seq[B:], ref[:B], ref[B:], num_pairs=float(B),
                                           chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], args=args)
            _step(model, opt, loss + aux)
    return margins


def check_preference_optimises(fn: LossFn, args: Optional[dict[str, Any]] = None, *, steps: int = 6,
                               seed: int = 0, min_margin: float = 1.0,
                               policy: Callable[..., nn.Module] = toy_hybrid) -> CheckReport:
    """The loss prefers the chosen responses: ``steps`` steps on fixed toy pairs raise the mean
    chosen-minus-rejected log-prob margin (over the reference's) from 0 to at least
    ``min_margin`` nats. ``policy``: toy_hybrid or toy_transformer (or any ``f(seed, tokenizer)``)."""
    name = "raises the chosen-minus-rejected margin"
    margins = train_preference(fn, args, steps=steps, seed=seed, policy=policy)
    final = margins[-1]
    ok = final >= min_margin
    trace = " ".join(f"{m:.2f}" for m in margins)
    detail = (f"{name}: margin {margins[0]:.2f} -> {final:.2f} nats over {steps} steps [{trace}]: "
              f"{final:.2f} {'>=' if ok else '<'} {min_margin}")
    return CheckReport(name, ok, final, min_margin, detail).raise_if_failed()
