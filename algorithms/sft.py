"""Supervised fine-tuning loss: token-level NLL over the target (completion/assistant) tokens."""

from __future__ import annotations

from torch import Tensor

from ._checks import validate_token_inputs
from .aggregation import Count, aggregate_token_loss


def sft_loss(logprobs: Tensor, mask: Tensor, *, num_tokens: Count | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean negative log-likelihood: ``sum_it -logp_it * m_it / num_tokens``.

    ``logprobs`` ``[B, T]`` are the log-probs of the target tokens, ``mask`` ``[B, T]`` selects
    the trained tokens (0/1 float or bool). Normaliser: ``num_tokens``, the number of target
    tokens in the whole optimizer step (all micro-batches and ranks), so long and short
    examples weigh per token whatever the micro-batching; default this mask's sum. An empty
    mask gives a loss of exactly 0 (gradient 0).

    Metrics: ``loss``, ``nll`` (this micro-batch's token-mean NLL, independent of
    ``num_tokens``), ``tokens``.
    """
    keep, maskf, t = validate_token_inputs(logprobs, mask)
    nll = -t["logprobs"]  # type: ignore[operator]
    loss = aggregate_token_loss(nll, maskf, "token_mean", num_tokens=num_tokens)
    metrics = {
        "loss": loss.detach(),
        "nll": (nll.detach() * maskf).sum() / maskf.sum().clamp(min=1.0),
        "tokens": maskf.sum(),
    }
    return loss, metrics
