"""Run TRL 1.16's own loss code on toy tensors, as an independent reference.

TRL computes its losses inside ``DPOTrainer._compute_loss`` / ``GRPOTrainer._compute_loss``,
which need a trainer and a model. Those methods only read a handful of attributes, so we
call the unbound functions with a minimal stand-in ``self`` (a namespace holding exactly the
attributes they read) and a fake model/log-prob function that returns the toy tensors. Any
attribute TRL starts to read in a later version makes these helpers fail loudly
(AttributeError), not silently.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def gather(x: Tensor) -> Tensor:
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x: Tensor, reduction: str = "sum") -> Tensor:
        return x


def _metrics() -> defaultdict:
    return defaultdict(lambda: defaultdict(list))


def trl_dpo_loss(
    chosen_tok: Tensor,
    rejected_tok: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """TRL's DPO loss from per-token log-probs ``[B, T]`` (masked: 0 at padding) and masks.

    Returns the loss (differentiable in ``chosen_tok``/``rejected_tok``) and TRL's logged metrics.
    """
    per_token = torch.cat([chosen_tok * chosen_mask, rejected_tok * rejected_mask], dim=0)  # [2B, T]
    two_b, t = per_token.shape
    # TRL shifts: completion_mask[..., 1:] lines up with the per-token log-probs; position 0 is prompt.
    completion_mask = torch.cat([torch.zeros(two_b, 1), torch.cat([chosen_mask, rejected_mask], 0).float()], 1)
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(two_b, t),
        mean_logits=torch.zeros(two_b, t),
        is_top1=torch.zeros(two_b, t, dtype=torch.bool),
    )
    model = lambda **kwargs: outputs  # noqa: E731 - the fake forward
    model.training = True
    trainer = SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(two_b, t + 1, dtype=torch.long),
        "attention_mask": torch.ones(two_b, t + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    is_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """TRL's GRPO-family loss (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``) on toy tensors.

    Evaluated in eval mode so no gradient-accumulation rescaling applies (one micro-batch).
    """
    b, t = logprobs.shape

    def fake_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return logprobs, torch.zeros(b, t, dtype=logprobs.dtype), None

    model = SimpleNamespace(training=False)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=fake_logps,
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        _metrics=_metrics(),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logprobs,
    }
    if ref_logprobs is not None:
        inputs["ref_per_token_logps"] = ref_logprobs
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch))
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


# The repository runs pytest with --import-mode=importlib, where test modules cannot import
# sibling helpers; fixtures hand the reference functions to the tests instead.
@pytest.fixture
def trl_grpo():
    return trl_grpo_loss


@pytest.fixture
def trl_dpo():
    return trl_dpo_loss
