"""Policy-gradient losses on sampled completions: GRPO/PPO clipped surrogate and CISPO.

Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask`` are ``[B, T]`` over
completion tokens (``mask`` 0/1 float or bool); ``advantages`` is ``[B]``, broadcast over a
sequence's tokens (a ``[B, T]`` per-token advantage is accepted too). One row is one
sequence: ``seq_mean`` and ``ratio_level="sequence"`` work per row. ``old_logprobs`` are
the learner's log-probs of the policy that sampled the batch (detached); pass ``is_weight``
from :func:`rollout_correction` to correct for the rollout engine not being exactly that
policy (TIS/MIS).

Both losses return ``(loss, metrics)``; metrics are detached 0-dim tensors computed over
this micro-batch's tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    check_choice,
    masked_max,
    masked_mean,
    validate_advantages,
    validate_token_inputs,
    validate_weight,
)
from .aggregation import Count, aggregate_token_loss
from .kl import KL_ESTIMATORS, kl_penalty

RATIO_LEVELS = ("token", "sequence")

# exp() of a stale token's log-ratio overflows float32 beyond ~88; clamp like verl does.
# Only ratios beyond e^20 ~ 5e8 are affected, far outside any clip range.
_LOG_RATIO_BOUND = 20.0


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, maskf: Tensor, level: str) -> Tensor:
    """``log(pi / pi_old)`` per token ``[B, T]``; for ``level="sequence"`` the per-sequence mean
    of the token log-ratios (GSPO's length-normalised sequence ratio), broadcast over ``T``."""
    check_choice("ratio_level", level, RATIO_LEVELS)
    log_r = logprobs - old_logprobs.detach()  # padding is 0 - 0 = 0
    if level == "sequence":
        lengths = maskf.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_r = ((log_r * maskf).sum(dim=1, keepdim=True) / lengths).expand_as(log_r)
    return log_r.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)


def _check_clips(clip_low: float, clip_high: float, delta: float | None) -> None:
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1] (the ratio's lower bound is 1 - clip_low), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if delta is not None and not delta > 1.0 + clip_high:
        raise ValueError(f"delta must be > 1 + clip_high = {1.0 + clip_high} (INTELLECT-2's upper cap), got {delta}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "seq_mean",
    num_tokens: Count | None = None,
    max_len: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    ratio_level: str = "token",
    delta: float | None = None,
    neg_adv_drop_ratio: float | None = None,
    is_weight: Tensor | None = None,
    num_sequences: Count | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / PPO clipped surrogate with the DAPO, Dr. GRPO, GSPO, INTELLECT-2 and MiniMax-01 options.

    Per token, with ``r = pi / pi_old`` and the sequence's advantage ``A``::

        pg = -min(r' * A, clip(r, 1 - clip_low, 1 + clip_high) * A)     (Schulman 2017; Shao 2024)
        r' = min(r, delta) if delta is not None else r                   (INTELLECT-2 two-sided clip)
        loss_t = is_weight * pg + kl_coef * KL_t

    - ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025).
    - ``ratio_level="sequence"``: ``r`` is the sequence's geometric-mean ratio
      ``exp(mean_t log r_t)`` for every token (GSPO, Zheng et al. 2025); gradients flow to all
      tokens of the sequence through it.
    - ``kl_estimator``: ``k1``, ``k2``, ``k3`` (DeepSeekMath) or ``prob`` (MiniMax-01's
      ``sg(pi - pi_ref) * log pi``); needs ``ref_logprobs`` when ``kl_coef != 0``. The KL is
      not multiplied by ``is_weight``.
    - ``neg_adv_drop_ratio``: MiniMax-01 drops (zero loss, zero gradient) the policy term of
      tokens with ``A < 0`` and ``r > neg_adv_drop_ratio``, whose gradient PPO leaves unbounded.
    - ``is_weight`` ``[B]``/``[B, 1]``/``[B, T]``: detached multiplier on the policy term (TIS/MIS).

    Normaliser (``aggregation``, see :func:`aggregate_token_loss`): ``"seq_mean"`` (default,
    GRPO: mean over each sequence's tokens, then sum / ``num_sequences``, default ``B``),
    ``"token_mean"`` (DAPO: sum / ``num_tokens``, the step's global token count, default this
    mask's sum), ``"fixed_len"`` (Dr. GRPO: sum / (``num_sequences`` * ``max_len``)).

    Metrics: ``loss``, ``pg_loss`` (policy part under the same normaliser), ``clip_frac_low``
    (``r < 1 - clip_low`` and ``A < 0``), ``clip_frac_high`` (``r > 1 + clip_high`` and
    ``A > 0``), ``clip_frac`` (either: tokens whose gradient the clip zeroed), ``ratio_mean``,
    ``ratio_max``, ``tokens``; with ``delta``: ``delta_frac``; with ``neg_adv_drop_ratio``:
    ``drop_frac``; with ``ref_logprobs``: ``kl`` (token mean of the chosen estimator) and
    ``kl_k3``. Fractions are token means over the mask.
    """
    _check_clips(clip_low, clip_high, delta)
    check_choice("kl_estimator", kl_estimator, tuple(KL_ESTIMATORS))
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    keep, maskf, t = validate_token_inputs(logprobs, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    logp, old, ref = t["logprobs"], t["old_logprobs"], t["ref_logprobs"]
    adv = validate_advantages(advantages, keep).to(logp.dtype)  # [B, 1] or [B, T]
    weight = validate_weight("is_weight", is_weight, keep)  # [B, T] or None

    ratio = torch.exp(_log_ratio(logp, old, maskf, ratio_level))  # [B, T]
    capped = ratio if delta is None else ratio.clamp(max=delta)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = -torch.min(capped * adv, clipped * adv)  # [B, T]

    r = ratio.detach()
    metrics: dict[str, Tensor] = {}
    if neg_adv_drop_ratio is not None:
        dropped = (adv < 0) & (r > neg_adv_drop_ratio) & keep
        pg = torch.where(dropped, torch.zeros_like(pg), pg)
        metrics["drop_frac"] = masked_mean(dropped.to(maskf.dtype), maskf)
    if weight is not None:
        pg = pg * weight

    agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len)
    per_token = pg
    if ref_logprobs is not None:
        kl = kl_penalty(logp, ref, kl_estimator)  # type: ignore[arg-type]
        if kl_coef != 0.0:
            per_token = pg + kl_coef * kl
        metrics["kl"] = masked_mean(kl.detach(), maskf)
        metrics["kl_k3"] = masked_mean(kl_penalty(logp.detach(), ref, "k3"), maskf)  # type: ignore[arg-type]
    loss = aggregate_token_loss(per_token, maskf, aggregation, **agg)

    low = (r < 1.0 - clip_low) & (adv < 0)
    high = (r > 1.0 + clip_high) & (adv > 0)
    metrics.update(
        loss=loss.detach(),
        pg_loss=aggregate_token_loss(pg.detach(), maskf, aggregation, **agg),
        clip_frac_low=masked_mean(low.to(maskf.dtype), maskf),
        clip_frac_high=masked_mean(high.to(maskf.dtype), maskf),
        clip_frac=masked_mean((low | high).to(maskf.dtype), maskf),
        ratio_mean=masked_mean(r, maskf),
        ratio_max=masked_max(r, keep),
        tokens=maskf.sum(),
    )
    if delta is not None:
        metrics["delta_frac"] = masked_mean(((r > delta) & (adv < 0)).to(maskf.dtype), maskf)
    return loss, metrics


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float,
    eps_low: float | None = None,
    num_tokens: Count | None = None,
    is_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, 2025): clip the importance-sampling weight, never the gradient.

    ::

        w_t  = sg(clip(r_t, 1 - eps_low, 1 + eps_high))      (no lower bound if eps_low is None)
        loss = -sum_it is_weight * w_t * A_i * log pi(o_it) * m_it / num_tokens

    ``r_t = pi / pi_old`` per token. Because ``w`` is a detached weight on ``log pi``, every
    unmasked token keeps a gradient ``-w A grad log pi`` (PPO clipping zeroes it instead);
    with all ``r`` inside the bounds this is token-mean REINFORCE. No KL term (the paper uses
    none). Normaliser: ``num_tokens``, the optimizer step's global token count (default: this
    mask's sum). Note the bound is ``1 + eps_high``; TRL's ``epsilon_high`` for CISPO is the
    cap itself (e.g. 5.0 there means ``eps_high = 4.0`` here).

    Metrics: ``loss``, ``clip_frac`` (tokens whose weight differs from ``r``), ``clip_frac_high``,
    ``clip_frac_low``, ``ratio_mean``, ``ratio_max``, ``weight_mean``, ``tokens``.
    """
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if eps_low is not None and not 0.0 <= eps_low <= 1.0:
        raise ValueError(f"eps_low must be in [0, 1] or None, got {eps_low}")
    keep, maskf, t = validate_token_inputs(logprobs, mask, old_logprobs=old_logprobs)
    logp, old = t["logprobs"], t["old_logprobs"]
    adv = validate_advantages(advantages, keep).to(logp.dtype)  # [B, 1] or [B, T]
    weight = validate_weight("is_weight", is_weight, keep)

    r = torch.exp(_log_ratio(logp, old, maskf, "token")).detach()  # [B, T]
    lower = None if eps_low is None else 1.0 - eps_low
    w = r.clamp(min=lower, max=1.0 + eps_high)
    pg = -(w * adv) * logp  # [B, T]
    if weight is not None:
        pg = pg * weight
    loss = aggregate_token_loss(pg, maskf, "token_mean", num_tokens=num_tokens)

    high = r > 1.0 + eps_high
    low = torch.zeros_like(high) if lower is None else r < lower
    metrics = {
        "loss": loss.detach(),
        "clip_frac": masked_mean((high | low).to(maskf.dtype), maskf),
        "clip_frac_high": masked_mean(high.to(maskf.dtype), maskf),
        "clip_frac_low": masked_mean(low.to(maskf.dtype), maskf),
        "ratio_mean": masked_mean(r, maskf),
        "ratio_max": masked_max(r, keep),
        "weight_mean": masked_mean(w, maskf),
        "tokens": maskf.sum(),
    }
    return loss, metrics
