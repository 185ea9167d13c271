"""What a check returns (CheckReport), what it raises (InvarianceError), and the comparisons
the checks share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor


INVARIANCE_RTOL = 1e-6  # float64 inputs: only a different formula, not rounding, gets near this
FLOAT32_RTOL = 1e-4  # float32 vs float64 of the same inputs (float16 arithmetic is ~1e-3 off)


class InvarianceError(AssertionError):
    """A loss broke an invariance; the message names it and says by how much.

    An AssertionError, so pytest shows it as a plain test failure. ``reports`` holds every
    report of the run that raised it (the failed ones have ``passed == False``)."""

    def __init__(self, message: str, reports: Iterable["CheckReport"] = ()) -> None:
        super().__init__(message)
        self.reports = list(reports)


@dataclass(frozen=True)
class CheckReport:
    """The outcome of one check: the measured value against its tolerance, and one line of
    ``detail`` (on failure, the sentence InvarianceError carries)."""

    name: str
    passed: bool
    measured: float
    tolerance: float
    detail: str

    def __str__(self) -> str:
        return f"[{'pass' if self.passed else 'FAIL'}] {self.detail}"

    def raise_if_failed(self) -> "CheckReport":
        if not self.passed:
            raise InvarianceError(self.detail, [self])
        return self


def raise_failures(reports: list[CheckReport]) -> list[CheckReport]:
    """Raise one InvarianceError naming every failed report, else return the reports."""
    failed = [r for r in reports if not r.passed]
    if failed:
        lines = "\n  ".join(r.detail for r in failed)
        raise InvarianceError(f"{len(failed)} of {len(reports)} checks failed:\n  {lines}", reports)
    return reports


def collect(check: Callable[[], CheckReport]) -> CheckReport:
    """Run a check that raises on failure; return its report either way."""
    try:
        return check()
    except InvarianceError as err:
        return err.reports[0]


def grad_of(loss: Tensor, leaf: Tensor) -> Tensor:
    """d loss / d leaf; zeros when the loss does not depend on the leaf (a detached loss is a
    finding for the checks, not a crash)."""
    if not loss.requires_grad:
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


def max_abs(x: Tensor) -> float:
    return float(x.detach().abs().max()) if x.numel() else 0.0


def compare(name: str, broken: str, what: str, full_loss: Tensor, full_grad: Tensor, loss: Tensor,
            grad: Tensor, rtol: float, note: str = "") -> CheckReport:
    """Report whether (loss, grad) equals (full_loss, full_grad) within ``rtol`` relative to
    their size. ``name`` is the invariance ("A == B"), ``broken`` its negation ("A != B"),
    ``what`` names the compared side in the loss message. Gradients are compared first: they
    are what the optimizer sees."""
    scale = max(max_abs(full_grad), max_abs(grad), 1e-30)
    g_rel = max_abs(grad.double() - full_grad.double()) / scale
    suffix = f" ({note})" if note else ""
    if not g_rel <= rtol:  # also catches NaN
        return CheckReport(name, False, g_rel, rtol,
                           f"{broken}: max |grad diff| / max |grad| = {g_rel:.1e} > tol {rtol:.0e}{suffix}")
    a, b = float(full_loss), float(loss)
    l_rel = abs(a - b) / max(abs(a), abs(b), 1e-12)
    if not l_rel <= rtol:
        return CheckReport(name, False, l_rel, rtol,
                           f"{broken}: {what} {b:.6g} != full-batch loss {a:.6g} (rel diff {l_rel:.1e} > tol {rtol:.0e})"
                           f"{suffix}")
    measured = max(g_rel, l_rel)
    return CheckReport(name, True, measured, rtol, f"{name}: rel diff {measured:.1e} <= tol {rtol:.0e}{suffix}")


def finite_report(name: str, cases: dict[str, Optional[str]]) -> CheckReport:
    """``cases`` maps each edge case to None (finite) or what went wrong there."""
    bad = {case: why for case, why in cases.items() if why is not None}
    if bad:
        detail = "; ".join(f"{case}: {why}" for case, why in bad.items())
        return CheckReport(name, False, float(len(bad)), 0.0, f"{name} fails on {detail}")
    return CheckReport(name, True, 0.0, 0.0, f"{name}: {', '.join(cases)}")


def non_finite(loss: Tensor, grad: Tensor) -> Optional[str]:
    """None if the loss and its gradient are finite, else what is not."""
    if not bool(torch.isfinite(loss.detach()).all()):
        return f"loss is {float(loss):g}"
    bad = int((~torch.isfinite(grad)).sum())
    return f"{bad} non-finite gradient entries" if bad else None
