"""Per-token quantities from logits: entropy and the log-prob of given tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def token_entropy(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of the next-token distribution, ``[B, T, V] -> [B, T]`` (float32 or wider).

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``, computed in float32 for bf16/fp16
    logits. It is position-wise, so the learner may call it on any slice of ``T``;
    ``chunk_size`` does that here, bounding the float32 ``[B, chunk, V]`` temporaries. It is
    differentiable (for an entropy bonus); wrap it in ``torch.no_grad()`` for logging.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {getattr(logits, 'shape', type(logits).__name__)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = logits.shape[1] if chunk_size is None else chunk_size
    parts = []
    for start in range(0, logits.shape[1], max(step, 1)):
        z = logits[:, start : start + step]
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        # -inf logits (banned tokens) have p = 0: take 0 * log 0 = 0, not 0 * -inf = NaN
        parts.append(-(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1))
    if not parts:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return torch.cat(parts, dim=1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-prob of ``tokens`` ``[B, T]`` under ``logits`` ``[B, T, V]`` (already aligned:
    ``logits[:, t]`` predicts ``tokens[:, t]``), in float32 or wider: ``[B, T]``."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {getattr(logits, 'shape', type(logits).__name__)}")
    if tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected {tuple(logits.shape[:2])} (logits[:2])")
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)
