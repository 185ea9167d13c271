"""Checks any policy loss (the convention of posttrain.algorithms.custom) must pass.

Every check calls the loss through ``call_policy_loss`` (so ``args`` reach it exactly as
the recipe's ``loss.args`` would), returns a CheckReport and raises InvarianceError on
failure. Gradients are taken with respect to ``logprobs`` and compared on the mask only:
the learner's log-probs are 0 with no path to the weights at padding, so nothing else
reaches the model. Invariance checks run in float64 so their tolerance can be tight.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from posttrain.algorithms.custom import call_policy_loss, policy_loss_signature_error
from posttrain.testing.batches import PolicyLossInputs, policy_loss_inputs
from posttrain.testing.report import (
    FLOAT32_RTOL, INVARIANCE_RTOL, CheckReport, InvarianceError, collect, compare, finite_report, grad_of,
    non_finite, raise_failures,
)

LossFn = Callable[..., Any]


def _invariance_inputs() -> PolicyLossInputs:
    return policy_loss_inputs(B=12, T=10, seed=0, dtype=torch.float64, ref=True, is_weight=True)


def loss_and_grad(fn: LossFn, x: PolicyLossInputs, args: Optional[dict[str, Any]], *,
                  num_tokens: float, num_sequences: float) -> tuple[Tensor, Tensor]:
    """The loss of micro-batch ``x`` under the given global counts, and its gradient with respect
    to ``x.logprobs`` (masked)."""
    leaf = x.logprobs.detach().clone().requires_grad_()
    loss, _ = call_policy_loss(fn, leaf, x.old_logprobs, x.advantages, x.mask, num_tokens=num_tokens,
                               num_sequences=num_sequences, ref_logprobs=x.ref_logprobs,
                               is_weight=x.is_weight, args=args)
    return loss.detach(), grad_of(loss, leaf) * x.mask


def _split_sum(fn: LossFn, x: PolicyLossInputs, args: Optional[dict[str, Any]], parts: list[Tensor],
               trim: bool) -> tuple[Tensor, Tensor]:
    """Sum of the micro-batch losses and of their gradients, each micro-batch normalised by the
    whole batch's counts: what the learner accumulates over one optimizer step."""
    total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(x.logprobs)
    for rows in parts:
        part = x.rows(rows, trim=trim)
        loss, g = loss_and_grad(fn, part, args, num_tokens=x.num_tokens, num_sequences=x.num_sequences)
        total = total + loss.double()
        grad[rows, : g.shape[1]] += g
    return total, grad


def check_policy_accumulation(fn: LossFn, args: Optional[dict[str, Any]] = None, *, micro_batches: int = 4,
                              inputs: Optional[PolicyLossInputs] = None) -> CheckReport:
    """Gradient accumulation 1xN == Nx1: the rows split into N micro-batches (same padding
    width), each called with the global ``num_tokens``/``num_sequences``; the summed losses and
    gradients equal the full batch's."""
    x = inputs if inputs is not None else _invariance_inputs()
    full_loss, full_grad = loss_and_grad(fn, x, args, num_tokens=x.num_tokens, num_sequences=x.num_sequences)
    parts = list(torch.arange(x.mask.shape[0]).tensor_split(micro_batches))
    loss, grad = _split_sum(fn, x, args, parts, trim=False)
    n = micro_batches
    return compare(f"gradient accumulation 1x{n} == {n}x1", f"gradient accumulation 1x{n} != {n}x1",
                   f"sum of the {n} micro-batch losses", full_loss, full_grad, loss, grad,
                   INVARIANCE_RTOL).raise_if_failed()


def check_policy_sharding(fn: LossFn, args: Optional[dict[str, Any]] = None, *, ranks: int = 3,
                          inputs: Optional[PolicyLossInputs] = None) -> CheckReport:
    """Data-parallel sharding == global batch: uneven shards of shuffled rows as ranks, each padded
    to its own longest row (as a rank collates its micro-batch), each called with the global
    counts; the sum of the ranks' losses and gradients equals the global batch's."""
    x = inputs if inputs is not None else _invariance_inputs()
    full_loss, full_grad = loss_and_grad(fn, x, args, num_tokens=x.num_tokens, num_sequences=x.num_sequences)
    B = x.mask.shape[0]
    order = torch.randperm(B, generator=torch.Generator().manual_seed(0))  # ranks get scattered rows
    cuts = sorted({max(1, B * (r + 1) // (ranks + 1) - r) for r in range(ranks - 1)})  # uneven shares
    parts = [p for p in order.tensor_split(cuts) if p.numel()]
    loss, grad = _split_sum(fn, x, args, parts, trim=True)
    sizes = "+".join(str(p.numel()) for p in parts)
    return compare(f"data-parallel sharding ({len(parts)} ranks) == global batch",
                   f"data-parallel sharding ({len(parts)} ranks: {sizes} rows) != global batch",
                   "sum of the rank losses", full_loss, full_grad, loss, grad, INVARIANCE_RTOL,
                   note="each rank padded to its own longest row").raise_if_failed()


def check_policy_direction(fn: LossFn, args: Optional[dict[str, Any]] = None) -> CheckReport:
    """Descent follows the advantages: on-policy (``old_logprobs == logprobs``, reference equal to
    the policy), minus the gradient must point along ``A * mask`` (cosine > 0), as every
    policy-gradient estimator's does at ratio 1. Catches a flipped sign and a loss with no
    gradient (a detached ratio) without running a model."""
    x = policy_loss_inputs(B=12, T=10, seed=1, dtype=torch.float64, spread=0.0, ref=True)
    _, g = loss_and_grad(fn, x, args, num_tokens=x.num_tokens, num_sequences=x.num_sequences)
    target = x.advantages.unsqueeze(1) * x.mask  # [B, T]
    name = "policy-gradient direction at ratio 1"
    norm = float(g.norm())
    if not norm > 0:
        return CheckReport(name, False, 0.0, 0.0, f"{name}: no gradient reaches logprobs (|grad| = {norm:g}; "
                           "is the ratio or the log-prob detached?)").raise_if_failed()
    cos = float((-g * target).sum()) / (norm * float(target.norm()))
    ok = cos > 0
    verdict = "points along" if ok else "points against"
    return CheckReport(name, ok, cos, 0.0, f"{name}: -grad {verdict} the advantages (cosine {cos:+.3f}"
                       f"{' > 0' if ok else ' <= 0; a sign error?'})").raise_if_failed()


def _edge_cases() -> dict[str, tuple[PolicyLossInputs, float, float]]:
    """Name -> (micro-batch, num_tokens, num_sequences) of the step it belongs to."""
    x = policy_loss_inputs(B=8, T=6, seed=2, dtype=torch.float32, ref=True, is_weight=True)
    empty_row = x.mask.clone()
    empty_row[1] = 0
    row = x.replace(mask=empty_row, logprobs=x.logprobs * empty_row, old_logprobs=x.old_logprobs * empty_row)
    zeros = torch.zeros_like(x.mask)
    batch = x.replace(mask=zeros, logprobs=x.logprobs * 0, old_logprobs=x.old_logprobs * 0,
                      ref_logprobs=x.ref_logprobs * 0)
    flip = torch.arange(x.mask.numel()).reshape(x.mask.shape) % 2 == 0  # alternate r = e^30, e^-30
    near0, far = torch.full_like(x.logprobs, -0.01), torch.full_like(x.logprobs, -30.0)
    logp = torch.where(flip, near0, far) * x.mask
    old = torch.where(flip, far, near0) * x.mask
    ratios = x.replace(logprobs=logp, old_logprobs=old, ref_logprobs=old)
    equal = x.replace(advantages=torch.zeros_like(x.advantages))
    n, s = x.num_tokens, x.num_sequences
    return {
        "an all-zero mask row": (row, row.num_tokens, s),
        "an all-zero mask micro-batch": (batch, n, 2 * s),  # the step's tokens are in other micro-batches
        "extreme ratios (logprob - old = +-30)": (ratios, n, s),
        "all-equal rewards (advantages 0)": (equal, n, s),
    }


def check_policy_finite(fn: LossFn, args: Optional[dict[str, Any]] = None) -> CheckReport:
    """Finite loss and gradient on the edge cases a run meets: a masked (truncated) completion,
    a micro-batch with no loss token at all, log-ratios of +-30, and a batch whose groups all
    had equal rewards. A loss that raises on one of them fails too (the run would stop)."""
    cases: dict[str, Optional[str]] = {}
    for case, (x, n, s) in _edge_cases().items():
        try:
            loss, g = loss_and_grad(fn, x, args, num_tokens=n, num_sequences=s)
            cases[case] = non_finite(loss, g)
        except Exception as err:  # noqa: BLE001 - any exception is the finding
            cases[case] = f"raised {type(err).__name__}: {err}"
    return finite_report("finite loss and gradients", cases).raise_if_failed()


def check_policy_float64(fn: LossFn, args: Optional[dict[str, Any]] = None, *, rtol: float = FLOAT32_RTOL
                         ) -> CheckReport:
    """float32 agrees with a float64 re-computation of the same (float32-representable) inputs
    within ``rtol``, relative to the size of the loss and of the gradient. The learner feeds
    fp32 log-probs; a loss whose float32 arithmetic loses precision (an op that autocast runs
    in bf16/fp16, a cancellation float64 avoids) drifts from its own formula. A cast to half
    that the loss applies whatever the input dtype is invisible here: both runs share it."""
    x32 = policy_loss_inputs(B=12, T=10, seed=3, dtype=torch.float32, ref=True, is_weight=True)
    x64 = x32.to(torch.float64)
    loss32, g32 = loss_and_grad(fn, x32, args, num_tokens=x32.num_tokens, num_sequences=x32.num_sequences)
    loss64, g64 = loss_and_grad(fn, x64, args, num_tokens=x64.num_tokens, num_sequences=x64.num_sequences)
    return compare("float32 == float64 re-computation", "float32 != float64 re-computation", "float32 loss",
                   loss64, g64, loss32, g32, rtol).raise_if_failed()


def check_policy_loss(fn: LossFn, args: Optional[dict[str, Any]] = None, *, optimise: bool = True,
                      steps: int = 10, reference: bool = False) -> list[CheckReport]:
    """Every policy-loss check: the calling convention, accumulation, sharding, direction,
    finiteness, float64 agreement, and (``optimise``) that a few steps of the toy hybrid raise
    the toy task's reward and, with the reward negated, lower it. Runs them all, then raises
    one InvarianceError naming each failed check; returns the reports when all pass."""
    from posttrain.testing.optimise import check_policy_optimises

    why = policy_loss_signature_error(fn, args)
    if why is not None:
        raise InvarianceError(f"calling convention: {getattr(fn, '__name__', fn)} {why}")
    checks: list[Callable[[], CheckReport]] = [
        lambda: check_policy_accumulation(fn, args),
        lambda: check_policy_sharding(fn, args),
        lambda: check_policy_direction(fn, args),
        lambda: check_policy_finite(fn, args),
        lambda: check_policy_float64(fn, args),
    ]
    if optimise:
        checks += [lambda: check_policy_optimises(fn, args, steps=steps, reference=reference),
                   lambda: check_policy_optimises(fn, args, steps=steps, reference=reference, negate=True)]
    return raise_failures([collect(c) for c in checks])
