"""Online RL objectives: the policy losses of an rl stage, chosen by `loss.kind`.

The recipe's `loss:` is a tagged union: each kind is its own frozen config class holding only
its own knobs (an unknown key for the chosen kind is a load-time error) and computing its loss
from the pure functions of posttrain.algorithms:

    grpo    GRPOLoss    clipped surrogate (PPO/GRPO) with DAPO, Dr. GRPO, GSPO, INTELLECT-2 and
                        MiniMax-01 options (algorithms.grpo_loss)
    cispo   CISPOLoss   MiniMax-M1's clipped-IS-weight REINFORCE (algorithms.cispo_loss)
    custom  CustomPolicyLoss   a user's 'module:function' with the policy-loss signature of
                        posttrain.algorithms.custom, resolved and signature-checked at load time

`PolicyObjective` runs the model on an RLBatch and hands the loss config the per-token
log-probs; it is what crosses the Ray boundary to the learners, whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch

from posttrain.algorithms import cispo_loss, grpo_loss, rollout_correction
from posttrain.algorithms.custom import call_policy_loss, policy_loss_signature_error
from posttrain.data.collate import IGNORE_INDEX, Batch
from posttrain.objectives.common import Gathered, StepCounts, draws_noise, map_batches, target_logprobs
from posttrain.rollout import SamplingConfig
from posttrain.rollout import resolve_callable


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class GRPOLoss:
    """GRPO / PPO clipped surrogate (algorithms.grpo_loss; docs/algorithms.md has each formula)."""

    kind: Literal["grpo"] = "grpo"
    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.28  # ratio upper bound 1 + clip_high (> clip_low: DAPO clip-higher)
    delta: Optional[float] = None  # INTELLECT-2's cap on the unclipped ratio (> 1 + clip_high); null: off
    aggregation: Literal["seq_mean", "token_mean", "fixed_len"] = "token_mean"  # GRPO / DAPO / Dr. GRPO normaliser
    ratio_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's length-normalised sequence ratio
    kl_coef: float = 0.0  # > 0 adds a KL term to a frozen reference policy (the stage's starting model)
    kl_estimator: Literal["k1", "k2", "k3", "prob"] = "k3"  # prob: MiniMax-01's sg(pi - pi_ref) * log pi
    neg_adv_drop_ratio: Optional[float] = None  # MiniMax-01: drop tokens with A < 0 and ratio above this

    def __post_init__(self) -> None:
        checks = [
            (_finite(self.clip_low) and 0 <= self.clip_low <= 1, "clip_low", f"must be in [0, 1], got {self.clip_low}"),
            (_finite(self.clip_high) and self.clip_high >= 0, "clip_high", f"must be >= 0, got {self.clip_high}"),
            (self.delta is None or (_finite(self.delta) and self.delta > 1 + self.clip_high), "delta",
             f"must be null or > 1 + clip_high = {1 + self.clip_high}, got {self.delta}"),
            (_finite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}"),
            (self.neg_adv_drop_ratio is None or (_finite(self.neg_adv_drop_ratio) and self.neg_adv_drop_ratio > 0),
             "neg_adv_drop_ratio", f"must be null or > 0, got {self.neg_adv_drop_ratio}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def compute(self, logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                counts: StepCounts, max_len: int, ref_logprobs: Optional[torch.Tensor],
                is_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return grpo_loss(logp, old, advantages, mask, clip_low=self.clip_low, clip_high=self.clip_high,
                         aggregation=self.aggregation, num_tokens=counts.tokens, num_sequences=counts.sequences,
                         max_len=max_len, ref_logprobs=ref_logprobs, kl_coef=self.kl_coef,
                         kl_estimator=self.kl_estimator, ratio_level=self.ratio_level, delta=self.delta,
                         neg_adv_drop_ratio=self.neg_adv_drop_ratio, is_weight=is_weight)


@dataclass(frozen=True)
class CISPOLoss:
    """CISPO (MiniMax-M1, algorithms.cispo_loss): token mean over the step, no KL; every token
    keeps its gradient, the detached IS weight is clipped to [1 - eps_low, 1 + eps_high]."""

    kind: Literal["cispo"] = "cispo"
    eps_high: float = 4.0  # IS weight upper bound 1 + eps_high
    eps_low: Optional[float] = None  # IS weight lower bound 1 - eps_low; null: none (as in the paper)

    def __post_init__(self) -> None:
        if not (_finite(self.eps_high) and self.eps_high > 0):
            raise ValueError(f"eps_high: must be a finite number > 0, got {self.eps_high}")
        if self.eps_low is not None and not (_finite(self.eps_low) and 0 <= self.eps_low <= 1):
            raise ValueError(f"eps_low: must be null or in [0, 1], got {self.eps_low}")

    needs_reference = False

    def compute(self, logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                counts: StepCounts, max_len: int, ref_logprobs: Optional[torch.Tensor],
                is_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return cispo_loss(logp, old, advantages, mask, eps_high=self.eps_high, eps_low=self.eps_low,
                          num_tokens=counts.tokens, is_weight=is_weight)


@dataclass(frozen=True)
class CustomPolicyLoss:
    """A user's policy loss, 'module:function' with the signature documented in
    posttrain.algorithms.custom; `args` are passed as keyword arguments. Resolved and
    signature-checked when the config is built (load time)."""

    kind: Literal["custom"] = "custom"
    fn: str = ""  # 'package.module:function'
    args: dict[str, Any] = field(default_factory=dict)  # its own keyword arguments
    reference: bool = False  # load a frozen reference policy and pass ref_logprobs

    def __post_init__(self) -> None:
        try:
            problem = policy_loss_signature_error(resolve_callable(self.fn), self.args)
        except ValueError as e:
            problem = str(e)
        if problem:
            raise ValueError(f"fn: {problem}")

    @property
    def needs_reference(self) -> bool:
        return self.reference

    def compute(self, logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                counts: StepCounts, max_len: int, ref_logprobs: Optional[torch.Tensor],
                is_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return call_policy_loss(resolve_callable(self.fn), logp, old, advantages, mask, num_tokens=counts.tokens,
                                num_sequences=counts.sequences, ref_logprobs=ref_logprobs, is_weight=is_weight,
                                args=self.args)


PolicyLoss = Union[GRPOLoss, CISPOLoss, CustomPolicyLoss]


@dataclass(frozen=True)
class CorrectionConfig:
    """TIS / MIS weight for the rollout-vs-learner mismatch (algorithms.rollout_correction)."""

    mode: Literal["tis", "mis"] = "tis"  # tis: truncate the IS ratio; mis: drop tokens outside [low, high]
    level: Literal["token", "sequence"] = "token"  # per-token ratio, or the sequence's product
    high: float = 2.0  # upper bound of the ratio
    low: Optional[float] = None  # lower bound (null: none for tis, 0 for mis)

    def __post_init__(self) -> None:
        if not (_finite(self.high) and self.high > 0):
            raise ValueError(f"high: must be a finite number > 0, got {self.high}")
        if self.low is not None and not (_finite(self.low) and 0 <= self.low < self.high):
            raise ValueError(f"low: must be null or in [0, high={self.high}), got {self.low}")


@dataclass
class RLBatch:
    """A micro-batch of sampled completions: one sequence (prompt ids + completion ids, exactly
    as the engine produced them) per row, right-padded. Flat tensor fields so the learner can
    move it to its device. Per-token fields are aligned with `targets` (position t scores token
    t + 1) and are 0 wherever targets == IGNORE_INDEX (prompt, padding, masked completions)."""

    input_ids: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, completion tokens only, IGNORE_INDEX elsewhere
    position_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    advantages: torch.Tensor  # [B] float32
    rollout_logprobs: torch.Tensor  # [B, T] float32, the engine's log-probs of the targets
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] learner log-probs of the sampling policy
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] frozen reference policy (KL)

    @property
    def model_batch(self) -> Batch:
        return Batch(self.input_ids, self.targets, self.position_ids, self.attention_mask)

    @property
    def mask(self) -> torch.Tensor:  # [B, T] float32
        return (self.targets != IGNORE_INDEX).float()


@dataclass(frozen=True)
class PolicyObjective:
    """The rl stage's objective on one micro-batch of sampled completions.

    Log-probs are log softmax(logits / T) with T the sampling temperature (the engine's own
    convention), so they compare with the engine's (mismatch metrics, TIS/MIS) and with the
    old policy's. `old_logprobs` absent (one update per rollout batch): the current log-probs,
    detached; they are then also the sampling policy's, and come back from the learner (metric
    "old_logprobs", `Gathered`: the completion tokens' values, row-major) for the stage's mismatch
    metrics, so no separate no-grad pass computes them again. The router aux loss is weighted by
    this micro-batch's token share."""

    loss: PolicyLoss
    sampling: SamplingConfig  # temperature of the log-probs; max_new_tokens is Dr. GRPO's max_len
    correction: Optional[CorrectionConfig] = None
    chunk_size: int = 1024  # learner.loss_chunk_size

    def __call__(self, model: torch.nn.Module, batch: RLBatch, counts: StepCounts) -> tuple[torch.Tensor, dict[str, Any]]:
        logp, entropy, aux = target_logprobs(model, batch.model_batch, chunk_size=self.chunk_size,
                                             temperature=self.sampling.temperature, with_entropy=True,
                                             share_prefixes=True)
        mask = batch.mask
        old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
        is_weight, corr = None, {}
        if self.correction is not None:
            c = self.correction
            is_weight, corr = rollout_correction(old, batch.rollout_logprobs, mask, mode=c.mode, level=c.level,
                                                 high=c.high, low=c.low)
        loss, metrics = self.loss.compute(logp, old, batch.advantages, mask, counts=counts,
                                          max_len=self.sampling.max_new_tokens, ref_logprobs=batch.ref_logprobs,
                                          is_weight=is_weight)
        share = mask.sum() / counts.tokens
        out = contributions(loss, metrics, corr, entropy, aux, mask, counts.tokens)
        if batch.old_logprobs is None:
            out["old_logprobs"] = Gathered(self._sampling_logprobs(model, batch, logp)[mask.bool()].cpu())
        return loss + aux * share, out

    def _sampling_logprobs(self, model: torch.nn.Module, batch: RLBatch, logp: torch.Tensor) -> torch.Tensor:
        """The sampling policy's log-probs `[B, T]` (fp32, detached) when this forward's weights
        sampled the batch: this forward's own, or, where a train-mode forward is random
        (dropout, router jitter), an eval-mode no-grad pass like `logprobs` (what the engine
        samples from)."""
        if not draws_noise(model):
            return logp.detach().float()
        return map_batches(model, [batch], lambda m, b: target_logprobs(
            m, b.model_batch, chunk_size=self.chunk_size, temperature=self.sampling.temperature,
            share_prefixes=True)[0].float())[0]

    def logprobs(self, model: torch.nn.Module, batches: list[Any]) -> list[torch.Tensor]:
        """Per-target log-probs `[B, T]` (CPU, fp32) of each batch under `model`, no gradient: the
        sampling policy's ('old') log-probs on the learner, a frozen reference's for KL.
        Accepts Batch or RLBatch."""

        def one(m: torch.nn.Module, b: Any) -> torch.Tensor:
            mb = b.model_batch if isinstance(b, RLBatch) else b
            logp, _, _ = target_logprobs(m, mb, chunk_size=self.chunk_size, temperature=self.sampling.temperature,
                                         share_prefixes=True)
            return logp.float().cpu()

        return map_batches(model, batches, one)


def contributions(loss: torch.Tensor, metrics: dict[str, torch.Tensor], extra: dict[str, torch.Tensor],
                  entropy: torch.Tensor, aux: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> dict[str, Any]:
    """Turn a pure loss's micro-batch metrics into contributions that sum to the step's value:
    loss terms are already divided by the step's normaliser; token means are weighted by this
    micro-batch's share of the step's tokens. Max/min metrics cannot be summed and are dropped."""
    tokens = mask.sum()
    share = tokens / num_tokens
    out: dict[str, Any] = {"tokens": tokens.detach(), "aux_loss": (aux * share).detach(),
                           "entropy": ((entropy.detach() * mask).sum() / num_tokens)}
    for k, v in {**metrics, **extra}.items():
        if k in ("loss", "pg_loss"):
            out[k] = v.detach()
        elif k in ("tokens",) or k.endswith("_max") or k.endswith("_min"):
            continue
        else:
            out[k] = (v * share).detach()
    return out
