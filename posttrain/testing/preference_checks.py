"""Checks any preference loss (the convention of posttrain.algorithms.custom) must pass.

The same invariances as for policy losses, on sequence log-probs: the loss is called through
``call_preference_loss``; gradients are taken with respect to the policy's ``chosen_logps``
and ``rejected_logps`` (the reference's are constants).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from posttrain.algorithms.custom import call_preference_loss, preference_loss_signature_error
from posttrain.testing.batches import PreferenceLossInputs, preference_loss_inputs
from posttrain.testing.report import (
    FLOAT32_RTOL, INVARIANCE_RTOL, CheckReport, InvarianceError, collect, compare, finite_report, grad_of,
    non_finite, raise_failures,
)

LossFn = Callable[..., Any]


def _invariance_inputs() -> PreferenceLossInputs:
    return preference_loss_inputs(B=12, seed=0, dtype=torch.float64)


def preference_loss_and_grad(fn: LossFn, x: PreferenceLossInputs, args: Optional[dict[str, Any]], *,
                             num_pairs: float) -> tuple[Tensor, Tensor]:
    """The loss of micro-batch ``x`` under the global ``num_pairs`` and its gradient ``[2, B]``
    with respect to (chosen_logps, rejected_logps)."""
    leaf = torch.stack([x.chosen_logps, x.rejected_logps]).detach().clone().requires_grad_()
    loss, _ = call_preference_loss(fn, leaf[0], leaf[1], x.ref_chosen_logps, x.ref_rejected_logps,
                                   num_pairs=num_pairs, chosen_lengths=x.chosen_lengths,
                                   rejected_lengths=x.rejected_lengths, args=args)
    return loss.detach(), grad_of(loss, leaf)


def _split_sum(fn: LossFn, x: PreferenceLossInputs, args: Optional[dict[str, Any]],
               parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    total, grad = torch.zeros((), dtype=torch.float64), torch.zeros(2, x.chosen_logps.shape[0], dtype=torch.float64)
    for rows in parts:
        loss, g = preference_loss_and_grad(fn, x.rows(rows), args, num_pairs=x.num_pairs)
        total = total + loss.double()
        grad[:, rows] += g.double()
    return total, grad


def _full(fn: LossFn, x: PreferenceLossInputs, args: Optional[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    loss, g = preference_loss_and_grad(fn, x, args, num_pairs=x.num_pairs)
    return loss, g.double()


def check_preference_accumulation(fn: LossFn, args: Optional[dict[str, Any]] = None, *, micro_batches: int = 4,
                                  inputs: Optional[PreferenceLossInputs] = None) -> CheckReport:
    """Gradient accumulation 1xN == Nx1 over pairs, each micro-batch called with the global
    ``num_pairs``."""
    x = inputs if inputs is not None else _invariance_inputs()
    full_loss, full_grad = _full(fn, x, args)
    parts = list(torch.arange(x.chosen_logps.shape[0]).tensor_split(micro_batches))
    loss, grad = _split_sum(fn, x, args, parts)
    n = micro_batches
    return compare(f"gradient accumulation 1x{n} == {n}x1", f"gradient accumulation 1x{n} != {n}x1",
                   f"sum of the {n} micro-batch losses", full_loss, full_grad, loss, grad,
                   INVARIANCE_RTOL).raise_if_failed()


def check_preference_sharding(fn: LossFn, args: Optional[dict[str, Any]] = None, *, ranks: int = 3,
                              inputs: Optional[PreferenceLossInputs] = None) -> CheckReport:
    """Data-parallel sharding == global batch: uneven shards of shuffled pairs as ranks, each
    called with the global ``num_pairs``."""
    x = inputs if inputs is not None else _invariance_inputs()
    full_loss, full_grad = _full(fn, x, args)
    B = x.chosen_logps.shape[0]
    order = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    cuts = sorted({max(1, B * (r + 1) // (ranks + 1) - r) for r in range(ranks - 1)})
    parts = [p for p in order.tensor_split(cuts) if p.numel()]
    loss, grad = _split_sum(fn, x, args, parts)
    sizes = "+".join(str(p.numel()) for p in parts)
    return compare(f"data-parallel sharding ({len(parts)} ranks) == global batch",
                   f"data-parallel sharding ({len(parts)} ranks: {sizes} pairs) != global batch",
                   "sum of the rank losses", full_loss, full_grad, loss, grad, INVARIANCE_RTOL).raise_if_failed()


def check_preference_direction(fn: LossFn, args: Optional[dict[str, Any]] = None) -> CheckReport:
    """Descent prefers the chosen response: at policy == reference (the first step), every
    pair's gradient satisfies ``d loss/d chosen < d loss/d rejected`` (a step raises chosen
    relative to rejected). Catches a flipped sign and a loss with no gradient."""
    x = preference_loss_inputs(B=8, seed=1, dtype=torch.float64, spread=0.0)
    _, g = preference_loss_and_grad(fn, x, args, num_pairs=x.num_pairs)
    gap = g[0] - g[1]  # [B]
    name = "preference direction at policy == reference"
    worst = float(gap.max())
    ok = worst < 0
    why = "" if ok else ("; no gradient reaches the log-probs (detached?)" if float(gap.abs().max()) == 0
                         else "; a sign error?")
    return CheckReport(name, ok, worst, 0.0, f"{name}: max over pairs of d loss/d chosen - d loss/d rejected "
                       f"= {worst:+.3g} {'<' if ok else '>='} 0{why}").raise_if_failed()


def _edge_cases() -> dict[str, tuple[PreferenceLossInputs, float]]:
    x = preference_loss_inputs(B=6, seed=2, dtype=torch.float32)
    big = torch.tensor([300.0, -300.0, 300.0, -300.0, 300.0, -300.0])
    return {
        "margins of +-600 nats": (x.replace(chosen_logps=x.ref_chosen_logps + big,
                                            rejected_logps=x.ref_rejected_logps - big), x.num_pairs),
        "identical chosen and rejected": (x.replace(rejected_logps=x.chosen_logps,
                                                    ref_rejected_logps=x.ref_chosen_logps), x.num_pairs),
        "very long responses (-5000 nats, 4000 tokens)": (
            x.replace(chosen_logps=x.chosen_logps - 5000, rejected_logps=x.rejected_logps - 5000,
                      ref_chosen_logps=x.ref_chosen_logps - 5000, ref_rejected_logps=x.ref_rejected_logps - 5000,
                      chosen_lengths=x.chosen_lengths + 4000, rejected_lengths=x.rejected_lengths + 4000),
            x.num_pairs),
        "a single pair of a larger step": (x.rows(torch.tensor([0])), x.num_pairs),
    }


def check_preference_finite(fn: LossFn, args: Optional[dict[str, Any]] = None) -> CheckReport:
    """Finite loss and gradients on extreme margins, ties, very long responses and a one-pair
    micro-batch; a loss that raises on one of them fails too."""
    cases: dict[str, Optional[str]] = {}
    for case, (x, n) in _edge_cases().items():
        try:
            cases[case] = non_finite(*preference_loss_and_grad(fn, x, args, num_pairs=n))
        except Exception as err:  # noqa: BLE001 - any exception is the finding
            cases[case] = f"raised {type(err).__name__}: {err}"
    return finite_report("finite loss and gradients", cases).raise_if_failed()


def check_preference_float64(fn: LossFn, args: Optional[dict[str, Any]] = None, *, rtol: float = FLOAT32_RTOL
                             ) -> CheckReport:
    """float32 agrees with a float64 re-computation of the same inputs within ``rtol``."""
    x32 = preference_loss_inputs(B=8, seed=3, dtype=torch.float32)
    x64 = x32.to(torch.float64)
    loss32, g32 = preference_loss_and_grad(fn, x32, args, num_pairs=x32.num_pairs)
    loss64, g64 = preference_loss_and_grad(fn, x64, args, num_pairs=x64.num_pairs)
    return compare("float32 == float64 re-computation", "float32 != float64 re-computation", "float32 loss",
                   loss64, g64, loss32, g32, rtol).raise_if_failed()


def check_preference_loss(fn: LossFn, args: Optional[dict[str, Any]] = None, *, optimise: bool = True,
                          steps: int = 6) -> list[CheckReport]:
    """Every preference-loss check (convention, accumulation, sharding, direction, finiteness,
    float64 and, with ``optimise``, a few steps on toy pairs raising the margin). Raises one
    InvarianceError naming each failed check; returns the reports when all pass."""
    from posttrain.testing.optimise import check_preference_optimises

    why = preference_loss_signature_error(fn, args)
    if why is not None:
        raise InvarianceError(f"calling convention: {getattr(fn, '__name__', fn)} {why}")
    checks: list[Callable[[], CheckReport]] = [
        lambda: check_preference_accumulation(fn, args),
        lambda: check_preference_sharding(fn, args),
        lambda: check_preference_direction(fn, args),
        lambda: check_preference_finite(fn, args),
        lambda: check_preference_float64(fn, args),
    ]
    if optimise:
        checks.append(lambda: check_preference_optimises(fn, args, steps=steps))
    return raise_failures([collect(c) for c in checks])
