"""Offline preference losses on sequence log-probs: DPO and its IPO / hinge / robust variants.

Inputs are per-pair sequence log-probs ``[B]``: the *sum* of the completion tokens'
log-probs under the policy (``chosen_logps``, ``rejected_logps``) and under the frozen
reference (``ref_*``, precomputed once). With the implicit rewards
``h_w = beta * (chosen - ref_chosen)`` and ``h_l = beta * (rejected - ref_rejected)`` and the
margin ``d = (chosen - ref_chosen) - (rejected - ref_rejected)``:

- ``sigmoid`` (DPO, Rafailov et al. 2023; conservative label smoothing ``eps``, Mitchell 2023):
  ``-(1 - eps) * logsig(beta d) - eps * logsig(-beta d)``
- ``ipo`` (Azar et al. 2023, Eq. 17, length-normalised as in TRL):
  ``(d_avg - 1 / (2 beta))^2`` with ``d_avg = (chosen - ref_chosen) / |y_w| - (rejected - ref_rejected) / |y_l|``
- ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - beta d)``
- ``robust`` (Chowdhury et al. 2024, noisy labels with flip rate ``eps``):
  ``((1 - eps) * -logsig(beta d) + eps * logsig(-beta d)) / (1 - 2 eps)``

Normaliser: mean over pairs (``sum / num_pairs``, default ``B``; pass the step's global pair
count for exact gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import as_float, check_choice, check_finite, check_positive_count, check_shape
from .aggregation import Count


def _sigmoid(d: Tensor, beta: float, eps: float) -> Tensor:
    return -(1.0 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)


def _hinge(d: Tensor, beta: float, eps: float) -> Tensor:
    return torch.relu(1.0 - beta * d)


def _robust(d: Tensor, beta: float, eps: float) -> Tensor:
    return ((1.0 - eps) * -F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1.0 - 2.0 * eps)


def _ipo(d_avg: Tensor, beta: float, eps: float) -> Tensor:
    return (d_avg - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
}


def _check_smoothing(loss_type: str, label_smoothing: float) -> None:
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for loss_type='sigmoid', got {label_smoothing}")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}, got {label_smoothing}")


def _lengths(name: str, lengths: Tensor | None, batch: int, why: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"{name} is required {why}")
    check_shape(name, lengths, (batch,), "chosen_logps")
    lengths = as_float(name, lengths).detach()
    if not bool((lengths > 0).all()):
        raise ValueError(f"{name} must be > 0 for every pair (token counts of the completions)")
    return lengths


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    rpo_alpha: float = 0.0,
    num_pairs: Count | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference loss over ``B`` pairs of sequence log-probs ``[B]`` (see module docstring).

    ``chosen_lengths``/``rejected_lengths`` ``[B]`` are the completion token counts; ``ipo``
    needs both, ``rpo_alpha > 0`` needs ``chosen_lengths``. ``rpo_alpha`` adds the RPO NLL term
    (Pang et al. 2024): ``rpo_alpha * (-chosen_logps / chosen_lengths)``, the per-token NLL of
    each chosen completion, averaged like the preference loss. (TRL's ``rpo_alpha`` instead
    takes a token mean over the whole batch of chosen tokens.)

    Metrics (detached, means over pairs): ``loss``, ``loss/pref``, ``loss/nll`` (with RPO),
    ``rewards/chosen`` (``beta * (chosen - ref_chosen)``), ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (fraction with chosen reward strictly greater),
    ``logps/chosen``, ``logps/rejected``.
    """
    check_choice("loss_type", loss_type, tuple(DPO_LOSSES))
    _check_smoothing(loss_type, label_smoothing)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not isinstance(chosen_logps, Tensor) or chosen_logps.dim() != 1:
        shape = tuple(chosen_logps.shape) if isinstance(chosen_logps, Tensor) else type(chosen_logps).__name__
        raise ValueError(f"chosen_logps must be a 1-D tensor [B] of sequence log-probs, got {shape}")
    batch = chosen_logps.shape[0]
    named = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    vals: dict[str, Tensor] = {}
    for name, x in named.items():
        check_shape(name, x, (batch,), "chosen_logps")
        vals[name] = as_float(name, x)
        check_finite(name, vals[name])
    if batch == 0:
        raise ValueError("chosen_logps is empty: dpo_loss needs at least one pair")
    pairs = float(batch) if num_pairs is None else num_pairs
    check_positive_count("num_pairs", pairs)

    chosen_ratio = vals["chosen_logps"] - vals["ref_chosen_logps"].detach()  # [B]
    rejected_ratio = vals["rejected_logps"] - vals["ref_rejected_logps"].detach()
    if loss_type == "ipo":
        why = "for loss_type='ipo' (the log-ratios are normalised by completion length, as in TRL)"
        c_len = _lengths("chosen_lengths", chosen_lengths, batch, why)
        r_len = _lengths("rejected_lengths", rejected_lengths, batch, why)
        margin = chosen_ratio / c_len - rejected_ratio / r_len
    else:
        margin = chosen_ratio - rejected_ratio
    pref = DPO_LOSSES[loss_type](margin, beta, label_smoothing)  # [B]
    per_pair = pref
    metrics: dict[str, Tensor] = {}
    if rpo_alpha != 0.0:
        c_len = _lengths("chosen_lengths", chosen_lengths, batch, "when rpo_alpha != 0 (per-token NLL)")
        nll = -vals["chosen_logps"] / c_len  # [B]
        per_pair = pref + rpo_alpha * nll
        metrics["loss/nll"] = nll.detach().mean()
    loss = per_pair.sum() / pairs

    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics.update(
        {
            "loss": loss.detach(),
            "loss/pref": pref.detach().mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "logps/chosen": vals["chosen_logps"].detach().mean(),
            "logps/rejected": vals["rejected_logps"].detach().mean(),
        }
    )
    return loss, metrics
