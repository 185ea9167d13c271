"""Training entry points used by the learner: hidden states, chunked token log-probs, checkpointing.

Works for our HybridForCausalLM and for any Hugging Face causal LM (`model.base_model` +
`model.get_output_embeddings()`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.models.hybrid import HybridForCausalLM, lm_head_fp32, router_aux_loss
from posttrain.models.varlen import block_causal_mask, positions_from_cu_seqlens

__all__ = ["forward_hidden", "token_logprobs", "set_gradient_checkpointing"]


def forward_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden states and the scaled router loss.

    input_ids `[B, T]`; position_ids `[B, T]` (RoPE positions; default 0..T-1, or restarting per
    document when cu_seqlens is given); cu_seqlens int32 `[N+1]` for one packed row (B == 1, see
    posttrain.models.varlen); attention_mask `[B, T]` (1 = token, 0 = padding) — optional, only
    needed for left padding and to keep padding out of the router loss.

    Returns (hidden `[B, T, D]`, aux 0-dim fp32 tensor = router_aux_loss_coef * load-balancing
    loss over the tokens of all layers (those with attention_mask 1 when it is given); 0 for
    dense models). Add aux to the loss as is. cu_seqlens and attention_mask are exclusive.
    """
    if isinstance(model, HybridForCausalLM):
        out = model.model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        return out.hidden, model.aux_loss(out.router_logits, token_mask=attention_mask)
    return _hf_forward_hidden(model, input_ids, position_ids, cu_seqlens, attention_mask)


def _hf_forward_hidden(model, input_ids, position_ids, cu_seqlens, attention_mask):
    config = model.config
    kwargs: dict = {}
    if cu_seqlens is not None:
        if input_ids.shape[0] != 1 or attention_mask is not None:
            raise ValueError("forward_hidden: cu_seqlens needs one packed row (B == 1) and no attention_mask")
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens)
        # flash-attention backends split documents from position_ids; the others need the mask
        if not str(config._attn_implementation).startswith("flash"):
            attention_mask = block_causal_mask(cu_seqlens)
    is_moe = hasattr(config, "output_router_logits") and hasattr(config, "router_aux_loss_coef")
    if is_moe:
        kwargs["output_router_logits"] = True
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    )
    hidden = out.last_hidden_state
    aux = torch.zeros((), device=hidden.device)
    if is_moe and out.router_logits:
        num_experts = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        aux = config.router_aux_loss_coef * router_aux_loss(
            list(out.router_logits), num_experts, config.num_experts_per_tok, token_mask
        )
    return hidden, aux


def token_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) under the LM head, chunked along T so `[tokens, V]` logits are never kept.

    hidden `[B, T, D]` (from forward_hidden); targets `[B, T]` long — the token whose probability
    is read at each position (the caller shifts: targets[:, t] = input_ids[:, t+1]). Any target
    < 0 (e.g. -100) is ignored: logprob (and entropy) 0 there.
    Returns fp32 logprobs `[B, T]`, and the fp32 entropy `[B, T]` of the full next-token
    distribution when `with_entropy`. Each chunk's logits are recomputed in backward
    (activation checkpointing). The head runs in fp32 when `model.config.posttrain_fp32_lm_head`
    is set (see posttrain.models.hybrid.lm_head_fp32); log-softmax is always fp32.

    Under DeepSpeed ZeRO-3 the LM head weight must be gathered by the caller (we read it directly,
    once, not per chunk): posttrain's learner does (posttrain.zero3.whole, docs/cluster.md).
    """
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} differ in [B, T]")
    head = model.get_output_embeddings()
    fp32 = lm_head_fp32(model.config)
    weight, bias = head.weight, head.bias
    if fp32:  # cast once (not per chunk); gradients flow back through the cast
        weight = weight.float()
        bias = None if bias is None else bias.float()
    lps, ents = [], []
    for s in range(0, hidden.shape[1], chunk_size):
        h, t = hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(_chunk, h, weight, bias, t, fp32, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk(h, weight, bias, t, fp32, with_entropy)
        lps.append(lp)
        ents.append(ent)
    logprobs = torch.cat(lps, dim=1)
    return (logprobs, torch.cat(ents, dim=1)) if with_entropy else logprobs


def _chunk(h, weight, bias, targets, fp32: bool, with_entropy: bool):
    """h `[B, c, D]`, targets `[B, c]` -> (logprob `[B, c]`, entropy `[B, c]` or None), fp32."""
    logits = F.linear(h.float() if fp32 else h, weight, bias).float()  # [B, c, V]
    lse = torch.logsumexp(logits, dim=-1)  # [B, c]
    valid = targets >= 0
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(valid, picked - lse, torch.zeros_like(lse))
    if not with_entropy:
        return logprob, None
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprob, torch.where(valid, entropy, torch.zeros_like(entropy))


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True, layers: Optional[Sequence[int]] = None) -> None:
    """Recompute decoder-layer activations in backward (non-reentrant torch checkpoint).

    Our model: per layer — `layers` lists the layer indices to checkpoint (None = all).
    HF models: all layers or none (`layers` must be None).
    """
    if isinstance(model, HybridForCausalLM):
        chosen = None if layers is None else set(layers)
        for i, layer in enumerate(model.model.layers):
            layer.gradient_checkpointing = enabled and (chosen is None or i in chosen)
        return
    if layers is not None:
        raise ValueError(f"{type(model).__name__}: per-layer gradient checkpointing is only supported for HybridForCausalLM")
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
