"""posttrain.algorithms: the math of post-training as pure functions over tensors (torch only).

Losses return ``(loss, metrics)`` with ``metrics`` a dict of detached 0-dim tensors. Shapes:
``logprobs``/``old_logprobs``/``ref_logprobs``/``mask`` are ``[B, T]`` over completion tokens,
``advantages`` is ``[B]``. See docs/algorithms.md for the formulas, normalisers and papers.
"""

from .advantages import SCALES, balanced_advantages, group_advantages
from .aggregation import AGGREGATIONS, aggregate_token_loss, token_count
from .corrections import mismatch_metrics, rollout_correction
from .custom import (
    call_policy_loss, call_preference_loss, policy_loss_signature_error, preference_loss_signature_error,
)
from .dpo import DPO_LOSSES, dpo_loss
from .entropy import token_entropy, token_logprobs
from .filters import TRUNCATED_REASONS, dynamic_sampling_mask, overlong_penalty, truncation_mask
from .kl import KL_ESTIMATORS, kl_metrics, kl_penalty
from .policy import RATIO_LEVELS, cispo_loss, grpo_loss
from .sft import sft_loss

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSSES",
    "KL_ESTIMATORS",
    "RATIO_LEVELS",
    "SCALES",
    "TRUNCATED_REASONS",
    "aggregate_token_loss",
    "balanced_advantages",
    "call_policy_loss",
    "call_preference_loss",
    "cispo_loss",
    "dpo_loss",
    "dynamic_sampling_mask",
    "grpo_loss",
    "group_advantages",
    "kl_metrics",
    "kl_penalty",
    "mismatch_metrics",
    "overlong_penalty",
    "policy_loss_signature_error",
    "preference_loss_signature_error",
    "rollout_correction",
    "sft_loss",
    "token_count",
    "token_entropy",
    "token_logprobs",
    "truncation_mask",
]
