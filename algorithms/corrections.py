"""Rollout/learner mismatch: importance-sampling corrections (TIS, MIS) and their metrics.

The rollout engine (vLLM, the native engine) samples with probabilities ``pi_rollout`` that
differ slightly from the learner's ``pi_old`` for the same weights (kernels, precision, MoE
routing). The policy-gradient estimate is then off-policy by ``rho = pi_old / pi_rollout =
exp(old_logprobs - rollout_logprobs)``. These functions turn ``rho`` into a detached weight
``[B, T]`` that multiplies the policy term (``is_weight=`` of :func:`grpo_loss` and
:func:`cispo_loss`):

- TIS, truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"): ``w = min(rho, high)`` (and ``max(., low)`` if ``low`` is given).
- MIS, masked IS (Yao, Liu et al. 2025 follow-up, "When speed kills stability"):
  ``w = rho * 1[low <= rho <= high]``: tokens (or whole sequences) with an extreme ratio are
  dropped instead of down-weighted, the others keep their IS weight.

``level="token"`` uses the per-token ratio; ``level="sequence"`` the product over the
sequence's tokens, ``rho_i = exp(sum_t (old - rollout))``, broadcast to its tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_choice, masked_max, masked_min, validate_token_inputs

MODES = ("tis", "mis")
LEVELS = ("token", "sequence")

# Metrics report ratios, which for a long sequence can overflow; clamp their log for logging.
_METRIC_LOG_BOUND = 50.0


def _bounds(low: float | None, high: float) -> tuple[float, float]:
    if not high > 0:
        raise ValueError(f"high must be > 0, got {high}")
    if low is not None and not 0.0 <= low < high:
        raise ValueError(f"low must be in [0, high={high}), got {low}")
    log_low = -math.inf if low is None or low == 0.0 else math.log(low)
    return log_low, math.log(high)


def rollout_correction(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    mode: str = "tis",
    level: str = "token",
    high: float = 2.0,
    low: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached IS weight ``[B, T]`` correcting rollout-vs-learner mismatch, plus metrics.

    Inputs ``[B, T]``: learner log-probs of the sampling policy (``old_logprobs``), the
    engine's own log-probs (``rollout_logprobs``), the loss ``mask``. ``mode="tis"``:
    ``w = clamp(rho, low, high)`` (``low=None``: no lower bound, as in the TIS paper, where
    ``high`` is ``C``). ``mode="mis"``: ``w = rho`` where ``low <= rho <= high`` and 0 elsewhere
    (``low=None`` means 0). The weight is 0 at masked-out positions. Computed in log space so a
    sequence-level product never overflows.

    Metrics (over masked tokens, or over sequences with at least one token for
    ``level="sequence"``): ``is_ratio_mean``, ``is_ratio_min``, ``is_ratio_max`` (the raw
    ``rho``), ``is_weight_mean``, and ``is_clip_frac`` (TIS: fraction truncated) or
    ``is_drop_frac`` (MIS: fraction dropped).
    """
    check_choice("mode", mode, MODES)
    check_choice("level", level, LEVELS)
    log_low, log_high = _bounds(low, high)
    keep, maskf, t = validate_token_inputs(old_logprobs, mask, rollout_logprobs=rollout_logprobs)
    old, rollout = t["logprobs"].detach(), t["rollout_logprobs"].detach()  # type: ignore[union-attr]
    log_rho = old - rollout  # [B, T], 0 at padding
    if level == "sequence":
        unit_keep = keep.any(dim=1, keepdim=True)  # [B, 1]
        log_rho = (log_rho * maskf).sum(dim=1, keepdim=True)  # [B, 1]
    else:
        unit_keep = keep
    unit_maskf = unit_keep.to(maskf.dtype)

    outside_high = log_rho > log_high
    outside_low = log_rho < log_low
    clamped = torch.exp(log_rho.clamp(min=log_low if log_low > -math.inf else None, max=log_high))
    if mode == "tis":
        weight = clamped
        frac_key, frac = "is_clip_frac", outside_high | outside_low
    else:
        dropped = outside_high | outside_low
        weight = torch.where(dropped, torch.zeros_like(clamped), clamped)
        frac_key, frac = "is_drop_frac", dropped
    weight = torch.where(keep, weight.expand_as(keep), torch.zeros((), dtype=weight.dtype, device=weight.device))

    rho = torch.exp(log_rho.clamp(-_METRIC_LOG_BOUND, _METRIC_LOG_BOUND))
    denom = unit_maskf.sum().clamp(min=1.0)
    metrics = {
        "is_ratio_mean": (rho * unit_maskf).sum() / denom,
        "is_ratio_min": masked_min(rho.expand_as(unit_keep), unit_keep),
        "is_ratio_max": masked_max(rho.expand_as(unit_keep), unit_keep),
        "is_weight_mean": (weight * maskf).sum() / maskf.sum().clamp(min=1.0),
        frac_key: (frac.to(maskf.dtype) * unit_maskf).sum() / denom,
    }
    return weight, metrics


def mismatch_metrics(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the rollout engine's log-probs are from the learner's, over the masked tokens.

    Inputs ``[B, T]``. Returns detached scalars: ``logp_abs_diff_mean``, ``logp_abs_diff_max``
    (``|learner - rollout|``), ``prob_pearson`` (Pearson correlation of the token
    probabilities ``exp(logp)``, the number MiniMax-M1 reports: 0.987 -> 0.997 with an fp32 LM
    head), ``is_ratio_mean``, ``is_ratio_min``, ``is_ratio_max`` (``exp(learner - rollout)``)
    and ``kl_k3`` (k3 estimate of KL(rollout || learner) on rollout samples). With no masked
    token every value is NaN; the correlation is NaN when either side has zero variance, and
    clamped to [-1, 1] (rounding can leave near-identical sides a hair above 1).
    These are metrics only; nothing here is differentiated.
    """
    keep, maskf, t = validate_token_inputs(learner_logprobs, mask, rollout_logprobs=rollout_logprobs)
    learner = t["logprobs"].detach()  # type: ignore[union-attr]
    rollout = t["rollout_logprobs"].detach()  # type: ignore[union-attr]
    nan = torch.tensor(float("nan"), dtype=learner.dtype, device=learner.device)
    if not bool(keep.any()):
        keys = ("logp_abs_diff_mean", "logp_abs_diff_max", "prob_pearson", "is_ratio_mean", "is_ratio_min")
        return {k: nan.clone() for k in (*keys, "is_ratio_max", "kl_k3")}
    diff = (learner - rollout)[keep]  # [K]
    p, q = learner[keep].exp(), rollout[keep].exp()
    pc, qc = p - p.mean(), q - q.mean()
    denom = torch.sqrt((pc * pc).sum() * (qc * qc).sum())
    pearson = torch.where(denom > 0, (pc * qc).sum() / torch.where(denom > 0, denom, torch.ones_like(denom)), nan)
    pearson = pearson.clamp(-1.0, 1.0)  # fp32 rounding put near-identical sides at 1 + 1e-7 (NaN stays NaN)
    ratio = diff.clamp(-_METRIC_LOG_BOUND, _METRIC_LOG_BOUND).exp()
    return {
        "logp_abs_diff_mean": diff.abs().mean(),
        "logp_abs_diff_max": diff.abs().max(),
        "prob_pearson": pearson,
        "is_ratio_mean": ratio.mean(),
        "is_ratio_min": ratio.min(),
        "is_ratio_max": ratio.max(),
        "kl_k3": (ratio - diff - 1.0).mean(),
    }
