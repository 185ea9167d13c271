"""Log-probs of right-padded rows that share prompts, with each distinct prompt run once.

An RL micro-batch holds G samples of each prompt: rows `prompt + completion`, right-padded,
the targets on the completion only. A plain forward runs every row's prompt again (on the
demo's retrieval task ~200 prompt tokens for 1-4 completion tokens, so ~98% of the learner's
work is the same prompts G times over). Here each distinct prefix runs once (the prefixes
packed into one row, as a packed SFT row), and returns its per-layer states:
lightning layers their final state, softmax layers their keys and values. Every row then runs
only its own tokens after the prefix, starting from its prefix's states (gathered, so the
gradient of a prefix is the sum over the rows that share it, as in the full forward).

The prefix of a row ends at its first target position t0 (tokens 0..t0): the hidden state at
t0 scores the first target and depends on the prefix alone. Same math as the full forward of
posttrain.models.logprobs.forward_hidden, up to float rounding (different matmul shapes and
chunk boundaries); the router aux loss counts each prefix token once per row that shares it,
as the full forward does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posttrain.models.hybrid import LINEAR, HybridForCausalLM, rope_cos_sin
from posttrain.models.lightning import lightning_attention
from posttrain.models.varlen import cu_seqlens_from_lengths

__all__ = ["SharedPrefixPlan", "plan_shared_prefixes", "shared_prefix_hidden"]


@dataclass
class SharedPrefixPlan:
    """Where each row's prefix ends and which distinct prefix it reads (CPU bookkeeping)."""

    prefix_len: list[int]  # [B] tokens 0..prefix_len-1 are the row's prefix (the last one scores the first target)
    lengths: list[int]  # [B] real tokens of the row
    group: list[int]  # [B] index of the row's distinct prefix
    prefixes: list[int]  # [U] a row holding each distinct prefix
    width: int  # W: positions per row in the compact layout (prefix_len - 1 .. prefix_len - 1 + W - 1)


def plan_shared_prefixes(input_ids: torch.Tensor, targets: torch.Tensor,
                         attention_mask: Optional[torch.Tensor]) -> Optional[SharedPrefixPlan]:
    """The plan for a right-padded batch, or None when the rows share no prefix (or the batch is
    not right-padded): then the plain forward is as cheap.

    input_ids, targets `[B, T]` (targets < 0: no target), attention_mask `[B, T]` (1 = token)."""
    if attention_mask is None or input_ids.dim() != 2:
        return None
    B, T = input_ids.shape
    mask = attention_mask.bool().cpu()
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(T)[None, :] < lengths[:, None])).all()) or bool((lengths == 0).any()):
        return None  # not right-padded
    has = (targets >= 0).cpu()
    if bool((has & ~mask).any()):
        return None  # a target on padding: only the full forward computes that position
    first = torch.where(has.any(1), has.int().argmax(1), lengths - 1)  # [B] first target position (or last token)
    prefix_len = (first + 1).tolist()
    lengths_l = lengths.tolist()
    ids = input_ids.cpu()
    keys: dict[tuple[int, ...], int] = {}
    group, prefixes = [], []
    for b in range(B):
        key = tuple(ids[b, : prefix_len[b]].tolist())
        if key not in keys:
            keys[key] = len(prefixes)
            prefixes.append(b)
        group.append(keys[key])
    if len(prefixes) == B:
        return None
    width = max(n - p + 1 for n, p in zip(lengths_l, prefix_len))
    return SharedPrefixPlan(prefix_len, lengths_l, group, prefixes, width)


def shared_prefix_hidden(model: HybridForCausalLM, input_ids: torch.Tensor, plan: SharedPrefixPlan
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final-norm hidden states in the compact layout and the scaled router aux loss.

    Returns (hidden `[B, W, D]`, positions long `[B, W]`, aux 0-dim): hidden[b, j] is the hidden
    state at position positions[b, j] = prefix_len[b] - 1 + j of row b, valid where that position
    is a real token of the row (< lengths[b]); elsewhere meaningless."""
    device = input_ids.device
    config, base = model.config, model.model
    B, W = input_ids.shape[0], plan.width
    group = torch.tensor(plan.group, device=device)
    p_len = torch.tensor(plan.prefix_len, device=device)
    lengths = torch.tensor(plan.lengths, device=device)

    # 1. distinct prefixes packed into one row (documents isolated by cu_seqlens): the linear
    #    layers and experts see only real tokens; keys and values are then laid out per prefix
    P = [plan.prefix_len[b] for b in plan.prefixes]
    longest, U = max(P), len(P)
    cu = cu_seqlens_from_lengths(P, device=device)
    packed = torch.cat([input_ids[b, :n] for b, n in zip(plan.prefixes, P)])[None]
    out = base(packed, cu_seqlens=cu, return_states=True)
    h_last = out.hidden[0, (cu[1:] - 1).long()][group]  # [B, D] hidden at each row's prefix end
    t = torch.arange(longest, device=device)[None, :]
    lengths_p = torch.tensor(P, device=device)[:, None]
    pre_mask = t < lengths_p  # [U, longest] real prefix keys (right-padded layout)
    at = (cu[:-1].long()[:, None] + t).clamp(max=packed.shape[1] - 1)  # [U, longest] packed index

    def per_prefix(x: torch.Tensor) -> torch.Tensor:  # [1, Hkv, sum P, D] -> [U, Hkv, longest, D]
        return x[0][:, at].transpose(0, 1)

    uses = torch.bincount(group, minlength=U).to(torch.float32)  # [U] rows reading each prefix
    weights = [uses.repeat_interleave(lengths_p[:, 0])]  # aux loss: a prefix token once per row reading it
    positions = p_len[:, None] - 1 + torch.arange(W, device=device)[None, :]  # [B, W]
    S = W - 1
    if S == 0:  # every row ends at its prefix
        aux = model.aux_loss(out.router_logits, token_mask=weights[0])
        return h_last[:, None], positions, aux

    # 2. each row's own tokens after its prefix (positions prefix_len .. prefix_len + W - 2)
    j = torch.arange(S, device=device)[None, :]  # [1, S]
    pos = p_len[:, None] + j  # [B, S]
    own_mask = pos < lengths[:, None]  # [B, S]
    own_ids = torch.where(own_mask, input_ids.gather(1, pos.clamp(max=input_ids.shape[1] - 1)), 0)
    h = base.embed_tokens(own_ids)  # [B, S, D]
    cos, sin = rope_cos_sin(config, pos, h.dtype)
    m = own_mask[:, :, None, None].to(h.dtype)
    # softmax layers: keys = the prefix's (padding masked) then the row's own (causal; a padded
    # query still sees itself so no softmax row is empty)
    own_keys = (j.T >= j) & (own_mask[:, None, :] | torch.eye(S, dtype=torch.bool, device=device))  # [B, S, S]
    keys_mask = torch.cat([pre_mask[group][:, None, :].expand(B, S, longest), own_keys], dim=2)[:, None]
    own_router = []
    for i, layer in enumerate(base.layers):
        x = layer.input_layernorm(h)
        attn = layer.self_attn
        if config.layer_types[i] == LINEAR:
            q, k, v = attn._qkv(x)  # [B, S, H, D]
            o, _ = lightning_attention(q * m, k * m, v * m, attn.slopes(device), initial_state=out.states[i][group])
            attn_out = attn._output(x, o)
        else:
            q, k, v = attn.project(x, cos, sin)  # q [B, H, S, D], k, v [B, Hkv, S, D]
            pk, pv = (per_prefix(x) for x in out.states[i])  # [U, Hkv, longest, D]
            keys, values = torch.cat([pk[group], k], dim=2), torch.cat([pv[group], v], dim=2)
            attn_out = attn.attend(q, keys, values, keys_mask, is_causal=False)
        h, router = layer.feed_forward(layer.residual_attn(x, attn_out))
        own_router.append(router)
    hidden = torch.cat([h_last[:, None], base.norm(h)], dim=1)  # [B, W, D]

    # router aux loss over the same tokens as the full forward
    logits = [torch.cat([a, b]) for a, b in zip(out.router_logits, own_router)]
    aux = model.aux_loss(logits, token_mask=torch.cat(weights + [own_mask.float().reshape(-1)]))
    return hidden, positions, aux
