"""Decoding API of the hybrid model for the native rollout engine (rollout/native.py).

Memory per slot: each lightning layer keeps one fixed-size fp32 state `[H, D, D]` (independent
of the sequence length); only the softmax layers keep a KV cache `[Hkv, max_len, D]`.

Typical engine loop (continuous batching over S slots):

    cache = DecodeCache(model, num_slots=S, max_len=L)
    logits, state = prefill(model, prompt_ids[None])       # logits fp32 [V]: next-token dist.
    cache.insert(slot, state)                               # slot now holds the prompt
    ... sample token for that slot from `logits` ...
    logits = decode_step(model, tokens, cache, active)      # tokens [S] long, active [S] bool
    ... sample next tokens from logits[active]; cache.release(slot) when a sequence ends ...

`decode_step` appends `tokens[s]` to every active slot s at position `cache.lengths[s]`
(RoPE position = current length), advances the length by one and returns the next-token
logits. `prefill_many` prefills several prompts in one batched forward. All functions run
under `torch.no_grad()`; put the model in eval mode (router jitter is training-only).
Logits are fp32; the LM head itself runs in fp32 when `config.posttrain_fp32_lm_head`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from posttrain.models.hybrid import LINEAR, HybridForCausalLM, rope_cos_sin
from posttrain.models.varlen import cu_seqlens_from_lengths

__all__ = ["SlotState", "DecodeCache", "prefill", "prefill_many", "decode_step", "decode_step_static"]


@dataclass
class SlotState:
    """One sequence after prefill: its length and per-layer attention state (layer index -> tensor)."""

    length: int
    linear: dict[int, torch.Tensor]  # lightning layer -> fp32 [H, D, D]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # softmax layer -> (k, v) [Hkv, length, D], RoPE applied


class DecodeCache:
    """States of S decoding slots, updated in place by `decode_step`.

    linear[i]: fp32 `[S, H, D, D]` for each lightning layer i; k[i], v[i]: `[S, Hkv, max_len, D]`
    (model dtype) for each softmax layer i; lengths: long `[S]` tokens held per slot.
    """

    def __init__(
        self,
        model: HybridForCausalLM,
        num_slots: int,
        max_len: int,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        c = model.config
        device = device or model.device
        dtype = dtype or model.dtype
        H, D = c.num_attention_heads, model.model.layers[0].self_attn.head_dim
        self.num_slots, self.max_len = num_slots, max_len
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.linear: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(c.layer_types):
            if kind == LINEAR:
                self.linear[i] = torch.zeros(num_slots, H, D, D, dtype=torch.float32, device=device)
            else:
                shape = (num_slots, c.num_key_value_heads, max_len, D)
                self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=device)

    def insert(self, slot: int, state: SlotState) -> None:
        """Load a prefilled sequence into `slot` (overwrites whatever the slot held)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"DecodeCache.insert: slot {slot} out of range [0, {self.num_slots})")
        if state.length >= self.max_len:
            raise ValueError(f"DecodeCache.insert: prompt of {state.length} tokens leaves no room (max_len={self.max_len})")
        for i, s in state.linear.items():
            self.linear[i][slot] = s
        for i, (k, v) in state.kv.items():
            self.k[i][slot, :, : state.length] = k
            self.v[i][slot, :, : state.length] = v
        self.lengths[slot] = state.length

    def release(self, slot: int) -> None:
        """Mark `slot` empty (its tensors are overwritten by the next insert)."""
        self.lengths[slot] = 0


@torch.no_grad()
def prefill(model: HybridForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, SlotState]:
    """Run one prompt `[1, T]`. Returns (next-token logits fp32 `[V]`, SlotState)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"prefill: input_ids must be [1, T], got {tuple(input_ids.shape)}")
    logits, states = prefill_many(model, [input_ids[0]])
    return logits[0], states[0]


@torch.no_grad()
def prefill_many(
    model: HybridForCausalLM, prompts: Sequence[torch.Tensor | list[int]], *, max_tokens: int = 65536
) -> tuple[torch.Tensor, list[SlotState]]:
    """Prefill N prompts. Returns (next-token logits fp32 `[N, V]`, one SlotState per prompt).

    Prompts go, shortest first, in groups of similar length: a group's left-padded batch holds
    at most `max_tokens` tokens (a longer prompt alone), so activation memory stays bounded,
    and at most PAD_SLACK times its real tokens, so each group runs as one padded batch with
    little padding (mixed lengths in one group would run packed, where the CPU lightning
    kernel goes document by document: 216 prompts of 64-256 tokens prefilled 2x slower).
    Results come back in the order of `prompts`.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = [[]]
    size = 0
    for i in order:
        n = len(prompts[i])  # the group's longest so far (ascending order)
        padded = (len(groups[-1]) + 1) * n
        if groups[-1] and (padded > max_tokens or padded > PAD_SLACK * (size + n)):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    results = [_prefill_group(model, [prompts[i] for i in g]) for g in groups]
    logits = torch.cat([r[0] for r in results]) if len(results) > 1 else results[0][0]
    states = [s for r in results for s in r[1]]
    done = [i for g in groups for i in g]  # position in `results` -> index in `prompts`
    back = torch.empty(len(done), dtype=torch.long)
    back[torch.tensor(done)] = torch.arange(len(done))
    return logits[back.to(logits.device)], [states[k] for k in back.tolist()]


PAD_SLACK = 1.25  # prefill_many: padded tokens per real token allowed in one group


def _prefill_group(
    model: HybridForCausalLM, prompts: Sequence[torch.Tensor | list[int]]
) -> tuple[torch.Tensor, list[SlotState]]:
    """One forward for N prompts. Returns (next-token logits fp32 `[N, V]`, SlotStates).

    Prompts of similar length run as one left-padded batch `[N, longest]`: lightning layers
    see zeroed q, k, v on the padding, so their state stays exactly zero until the prompt
    starts; RoPE positions start at 0 at each prompt's first token; softmax layers mask the
    padding keys. Equal lengths need no mask at all (fused causal attention). Very uneven
    lengths, where padding would mostly be wasted work, run as one packed row (cu_seqlens).
    """
    device = model.device
    ids = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in prompts]
    lengths = [int(x.numel()) for x in ids]
    N, longest = len(ids), max(lengths)
    if N * longest > 2 * sum(lengths):
        return _prefill_packed(model, ids, lengths)
    pads = [longest - n for n in lengths]
    batch = torch.zeros(N, longest, dtype=torch.long, device=device)
    for row, (x, pad) in enumerate(zip(ids, pads)):
        batch[row, pad:] = x
    mask = position_ids = None
    if any(pads):
        pad_t = torch.tensor(pads, device=device)[:, None]  # [N, 1]
        t = torch.arange(longest, device=device)[None, :]
        mask = (t >= pad_t).long()  # [N, longest]
        position_ids = (t - pad_t).clamp(min=0)
    out = model.model(batch, attention_mask=mask, position_ids=position_ids, return_states=True)
    logits = model.logits(out.hidden[:, -1]).float()  # [N, V]
    states = []
    for n, (length, pad) in enumerate(zip(lengths, pads)):
        linear, kv = {}, {}
        for i, st in enumerate(out.states):
            if model.config.layer_types[i] == LINEAR:
                linear[i] = st[n]
            else:
                kv[i] = (st[0][n, :, pad:], st[1][n, :, pad:])
        states.append(SlotState(length=length, linear=linear, kv=kv))
    return logits, states


def _prefill_packed(model: HybridForCausalLM, ids: list[torch.Tensor], lengths: list[int]):
    """prefill_many as one packed row (documents isolated via cu_seqlens)."""
    cu = cu_seqlens_from_lengths(lengths, device=model.device)
    out = model.model(torch.cat(ids)[None], cu_seqlens=cu, return_states=True)
    last = (cu[1:] - 1).long()
    logits = model.logits(out.hidden[0, last]).float()  # [N, V]
    states = []
    for n, length in enumerate(lengths):
        lo, hi = int(cu[n]), int(cu[n + 1])
        linear, kv = {}, {}
        for i, st in enumerate(out.states):
            if model.config.layer_types[i] == LINEAR:
                linear[i] = st[n]
            else:
                k, v = st
                kv[i] = (k[0, :, lo:hi], v[0, :, lo:hi])
        states.append(SlotState(length=length, linear=linear, kv=kv))
    return logits, states


@torch.no_grad()
def decode_step(
    model: HybridForCausalLM, tokens: torch.Tensor, cache: DecodeCache, active: torch.Tensor
) -> torch.Tensor:
    """Append tokens[s] to every active slot s and return next-token logits fp32 `[S, V]`.

    tokens: long `[S]` (ignored where inactive); active: bool `[S]`. Rows of inactive slots are 0.
    Raises if an active slot is full (length == max_len).

    When every slot is active (the steady state of continuous batching) the lightning states
    are updated in place in the cache and the softmax layers read the cache through views:
    no per-step copy of any state. Otherwise the active slots' lightning states are gathered
    once per layer and written back with one index_copy_.
    """
    S = cache.num_slots
    if tokens.shape != (S,) or active.shape != (S,):
        raise ValueError(f"decode_step: tokens and active must be [S={S}], got {tuple(tokens.shape)}, {tuple(active.shape)}")
    idx = torch.nonzero(active).flatten()  # [n]
    n = idx.numel()
    V = model.config.vocab_size
    if n == 0:
        return torch.zeros(S, V, dtype=torch.float32, device=tokens.device)
    everyone = n == S
    pos = cache.lengths if everyone else cache.lengths[idx]  # [n] position of the new token
    if int(pos.max()) >= cache.max_len:
        raise ValueError(f"decode_step: a slot reached max_len={cache.max_len}")
    base = model.model
    h = base.embed_tokens(tokens if everyone else tokens[idx])  # [n, hidden]
    cos, sin = rope_cos_sin(model.config, pos[:, None], h.dtype)  # [n, 1, D]
    mask = torch.arange(int(pos.max()) + 1, device=pos.device)[None, :] <= pos[:, None]  # [n, L]
    for i, layer in enumerate(base.layers):
        x = layer.input_layernorm(h)
        if i in cache.linear:
            state = cache.linear[i]
            if everyone:
                attn_out = layer.self_attn.step_(x, state)
            else:
                sub = state.index_select(0, idx)
                attn_out = layer.self_attn.step_(x, sub)
                state.index_copy_(0, idx, sub)
        else:
            attn_out = _softmax_step(layer.self_attn, x, cos, sin, cache.k[i], cache.v[i], idx, pos, mask, everyone)
        h, _ = layer.feed_forward(layer.residual_attn(x, attn_out))
    logits = model.logits(base.norm(h)).float()  # [n, V]
    cache.lengths[idx] += 1
    if everyone:
        return logits
    out = torch.zeros(S, V, dtype=torch.float32, device=tokens.device)
    out[idx] = logits
    return out


def _softmax_step(attn, x, cos, sin, k_cache, v_cache, idx, pos, mask, everyone: bool) -> torch.Tensor:
    """Write this token's k, v at `pos` and attend over positions <= pos. x `[n, hidden]` -> `[n, hidden]`.

    mask: bool `[n, L]` with L = longest filled prefix among the active slots."""
    q, k, v = attn.project(x[:, None], cos, sin)  # q [n, H, 1, D], k, v [n, Hkv, 1, D]
    k_cache[idx, :, pos] = k[:, :, 0].to(k_cache.dtype)
    v_cache[idx, :, pos] = v[:, :, 0].to(v_cache.dtype)
    L = mask.shape[1]
    if everyone:  # views: the cache is read in place
        keys, values = k_cache[:, :, :L], v_cache[:, :, :L]
    else:
        keys, values = k_cache[idx, :, :L], v_cache[idx, :, :L]  # [n, Hkv, L, D]
    return attn.attend_one(q, keys.to(q.dtype), values.to(q.dtype), mask)


@torch.no_grad()
def decode_step_static(
    model: HybridForCausalLM, tokens: torch.Tensor, cache: DecodeCache, active: torch.Tensor
) -> torch.Tensor:
    """`decode_step` with fixed shapes and no host synchronisation: what a CUDA graph can
    capture once per cache and replay every step (rollout/native.py, `cuda_graphs`).

    tokens long `[S]`, active bool `[S]` -> logits fp32 `[S, V]`. Every slot is computed; an
    inactive slot's row is meaningless, its length does not move, and the states it holds
    change (a free slot's are overwritten by the next `insert`). Softmax layers attend over
    the whole cache under a mask (positions <= the slot's length), not over the longest filled
    prefix. The MoE routes on the device: the grouped GEMMs where they run, else every expert
    on every token weighted by the router's top-k (zero for the others). Unlike decode_step it
    cannot check that an active slot has room: the caller keeps length < max_len.
    """
    S = cache.num_slots
    if tokens.shape != (S,) or active.shape != (S,):
        raise ValueError(f"decode_step_static: tokens and active must be [S={S}], got {tuple(tokens.shape)}, "
                         f"{tuple(active.shape)}")
    base = model.model
    pos = cache.lengths  # [S]
    h = base.embed_tokens(tokens)  # [S, hidden]
    cos, sin = rope_cos_sin(model.config, pos[:, None], h.dtype)  # [S, 1, D]
    mask = torch.arange(cache.max_len, device=pos.device)[None, :] <= pos[:, None]  # [S, max_len]
    rows = torch.arange(S, device=pos.device)
    for i, layer in enumerate(base.layers):
        x = layer.input_layernorm(h)
        if i in cache.linear:
            attn_out = layer.self_attn.step_(x, cache.linear[i])
        else:
            attn = layer.self_attn
            q, k, v = attn.project(x[:, None], cos, sin)  # q [S, H, 1, D], k, v [S, Hkv, 1, D]
            cache.k[i][rows, :, pos] = k[:, :, 0].to(cache.k[i].dtype)
            cache.v[i][rows, :, pos] = v[:, :, 0].to(cache.v[i].dtype)
            attn_out = attn.attend_one(q, cache.k[i].to(q.dtype), cache.v[i].to(q.dtype), mask)
        h = layer.post_attention_layernorm(layer.residual_attn(x, attn_out))
        h = h * layer.mlp_alpha + _moe_on_device(layer.block_sparse_moe, h) * layer.mlp_beta
    logits = model.logits(base.norm(h)).float()  # [S, V]
    cache.lengths.add_(active.to(cache.lengths.dtype))
    return logits


def _moe_on_device(moe, x: torch.Tensor) -> torch.Tensor:
    """The MoE of x `[n, hidden]` without reading expert counts back to the host."""
    _, weights, chosen = moe.route(x)
    if moe.grouped(x):
        return moe.mix(x, weights, chosen)
    dense = torch.zeros(x.shape[0], len(moe.experts), dtype=weights.dtype, device=x.device)
    dense.scatter_(1, chosen, weights)  # [n, E]: the top-k weights, 0 for the other experts
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):  # expert order: decode_step's sum order per token
        out += (expert(x) * dense[:, e : e + 1]).to(x.dtype)
    return out
