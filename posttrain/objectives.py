"""Objectives: model + micro-batch -> (loss, metrics), built from posttrain.algorithms.

An objective is a module-level function (Ray ships it to the learner by reference). It
runs the model, gathers per-token log-probs and calls a pure loss. Metrics are returned
as contributions that *sum* to the step's value over micro-batches and ranks (each loss is
already divided by the global normaliser), so the learner only adds them up.
"""
from __future__ import annotations

from typing import Any

import torch

from posttrain.algorithms import sft_loss
from posttrain.data.collate import IGNORE_INDEX, Batch
from posttrain.models import forward_hidden, token_logprobs


def policy_logprobs(model: torch.nn.Module, batch: Batch, *, chunk_size: int = 1024,
                    with_entropy: bool = False):
    """Log-prob of each target token `[B, T]` (0 where targets == IGNORE_INDEX), router aux loss."""
    # The attention mask keeps right padding out of the router loss and out of attention:
    # without it, padded positions (no loss of their own) feed exploding gradients back
    # through the lightning layers' output norm.
    hidden, aux = forward_hidden(model, batch.input_ids, position_ids=batch.position_ids,
                                 cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask)
    out = token_logprobs(model, hidden, batch.targets, chunk_size=chunk_size, with_entropy=with_entropy)
    return out, aux


def sft_objective(model: torch.nn.Module, batch: Batch, *, num_tokens: int,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token-mean NLL over the optimizer step (normaliser `num_tokens`: all target tokens of
    the step, across micro-batches and ranks) plus the router load-balancing loss, weighted
    by this micro-batch's share of the step's tokens."""
    logp, aux = policy_logprobs(model, batch, chunk_size=chunk_size)
    mask = (batch.targets != IGNORE_INDEX).to(logp.dtype)  # [B, T]
    nll, _ = sft_loss(logp, mask, num_tokens=num_tokens)
    share = mask.sum() / num_tokens
    loss = nll + aux * share
    return loss, {"loss": nll.detach(), "aux_loss": (aux * share).detach(),
                  "tokens": mask.sum().detach()}
