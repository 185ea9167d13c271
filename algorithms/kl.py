"""Per-token KL penalties to a reference policy, estimated from samples of the current policy.

With ``x = ref_logprobs - logprobs = log(pi_ref / pi)`` at the sampled token (Schulman 2020,
"Approximating KL divergence"), each estimator of ``KL(pi || pi_ref)``:

- ``k1 = -x``                   unbiased, high variance, can be negative
- ``k2 = x^2 / 2``              biased, low variance, >= 0
- ``k3 = exp(x) - x - 1``       unbiased, low variance, >= 0 (GRPO / DeepSeekMath, TRL, verl "low_var_kl")
- ``prob = sg(pi - pi_ref) * log pi`` MiniMax-01's KL in probability space: not a divergence
  value but a surrogate whose gradient ``(pi - pi_ref) * grad log pi`` pushes the token
  probability towards the reference one; it stays bounded where ``log`` ratios blow up.

All are differentiable in ``logprobs`` (the current policy); ``ref_logprobs`` is detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_choice, validate_token_inputs


def _k1(logp: Tensor, ref: Tensor) -> Tensor:
    return logp - ref


def _k2(logp: Tensor, ref: Tensor) -> Tensor:
    return 0.5 * (logp - ref) ** 2


def _k3(logp: Tensor, ref: Tensor) -> Tensor:
    x = ref - logp
    return torch.exp(x) - x - 1.0


def _prob(logp: Tensor, ref: Tensor) -> Tensor:
    return (torch.exp(logp) - torch.exp(ref)).detach() * logp


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "prob": _prob,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL penalty ``[B, T]`` from ``logprobs`` and ``ref_logprobs`` (both ``[B, T]``).

    No masking and no validation: callers pass already-sanitised tensors (padding set to 0,
    where every estimator is 0). See the module docstring for the formulas.
    """
    check_choice("kl_estimator", estimator, tuple(KL_ESTIMATORS))
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs.detach())


def kl_metrics(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Token-mean of each estimator over ``mask`` (detached), for logging the distance to the
    reference whatever estimator the loss uses. Inputs ``[B, T]``."""
    keep, maskf, t = validate_token_inputs(logprobs, mask, ref_logprobs=ref_logprobs)
    logp, ref = t["logprobs"].detach(), t["ref_logprobs"].detach()  # type: ignore[union-attr]
    denom = maskf.sum().clamp(min=1.0)
    return {f"kl_{name}": (fn(logp, ref) * maskf).sum() / denom for name, fn in KL_ESTIMATORS.items()}
