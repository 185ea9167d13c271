"""The SFT objective: token-level NLL on the trained tokens (posttrain.algorithms.sft_loss)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.algorithms import sft_loss
from posttrain.data.collate import IGNORE_INDEX, Batch
from posttrain.objectives.common import StepCounts, target_logprobs


@dataclass(frozen=True)
class SFTObjective:
    """Token-mean NLL over the optimizer step (normaliser counts.tokens: all target tokens of the
    step, across micro-batches and ranks) plus the router load-balancing loss, weighted by this
    micro-batch's share of the step's tokens."""

    chunk_size: int = 1024  # learner.loss_chunk_size

    def __call__(self, model: torch.nn.Module, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, dict[str, Any]]:
        logp, _, aux = target_logprobs(model, batch, chunk_size=self.chunk_size)
        mask = (batch.targets != IGNORE_INDEX).to(logp.dtype)  # [B, T]
        nll, _ = sft_loss(logp, mask, num_tokens=counts.tokens)
        share = mask.sum() / counts.tokens
        loss = nll + aux * share
        return loss, {"loss": nll.detach(), "aux_loss": (aux * share).detach(), "tokens": mask.sum().detach()}
