"""Lightning attention (MiniMax-01's decayed linear attention) behind one function.

Per head h with decay rate (slope) s_h > 0, for t = 0..T-1 of one document:

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t        # state [D, D], S_{-1} = initial state (or 0)
    o_t = q_t S_t                                # no 1/sqrt(D) scaling, no normaliser

Layout everywhere in this module: q, k, v are `[B, T, H, D]` (flash-linear-attention's layout,
which is also what the projections produce without a transpose); states are `[B, H, D, D]`
(key dim first) in fp32.

Packed rows: with `cu_seqlens` (int `[N+1]`, 0 = cu[0] < ... < cu[N] = T, B must be 1) the
row holds N documents back to back; each starts from its own initial state (`[N, H, D, D]`,
zeros when None) and the final states are per document (`[N, H, D, D]`). No state crosses a
document boundary.

Backends: on CUDA, when flash-linear-attention (package `fla-core`) is importable,
`fla.ops.simple_gla.chunk_simple_gla` with `g_gamma = -slopes, scale = 1.0` for sequences and
`fused_recurrent_simple_gla` for decoding steps. fla's g_gamma is a per-head *log* decay applied
once per step (S_t = exp(g_gamma) S_{t-1} + k_t^T v_t), so g_gamma = -s is exactly MiniMax's
decay; its default scale is 1/sqrt(D), which MiniMax does not use. fla's own `lightning_attn`
op uses a different decay convention and must not be used here. Everywhere else a chunked
pure-torch form; its packed-row path pads documents into a batch (chunk-exact, see `_chunked`)
instead of looping over documents.
"""
from __future__ import annotations

from typing import Optional

import torch

from posttrain.models.fla_tuning import ensure_pinned

try:  # the CUDA kernels are optional (pip extra `gpu`); import errors mean "not available"
    from fla.ops.simple_gla import chunk_simple_gla as _fla_chunk_simple_gla
    from fla.ops.simple_gla import fused_recurrent_simple_gla as _fla_fused_recurrent
except Exception:  # noqa: BLE001 - fla raises various errors without triton / CUDA
    _fla_chunk_simple_gla = _fla_fused_recurrent = None

__all__ = [
    "lightning_slopes",
    "lightning_attention",
    "lightning_attention_torch",
    "lightning_attention_recurrent",
    "lightning_step",
    "lightning_step_",
    "fla_available",
]


def fla_available() -> bool:
    """True when the fla CUDA kernel can be dispatched to."""
    return _fla_chunk_simple_gla is not None


def lightning_slopes(
    num_heads: int, layer_idx: int, num_layers: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Per-head decay rates of layer `layer_idx` of `num_layers` (MiniMax-01, as transformers).

    s_h = 2^(-8 (h+1) / H) * (1 - l / (L - 1 + 1e-5) + 1e-5). Returns fp32 `[H]`.
    """
    base = 2.0 ** (-8.0 / num_heads)
    exponent = torch.arange(1, num_heads + 1, device=device, dtype=torch.float32)
    depth_factor = 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (base**exponent) * depth_factor


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decayed linear attention; see the module docstring for the math and layouts.

    q, k, v: `[B, T, H, D]`; slopes: `[H]` (positive); cu_seqlens: int `[N+1]` (B == 1) or None;
    initial_state: fp32 `[B or N, H, D, D]` or None. Returns (o `[B, T, H, D]` in v's dtype,
    final state fp32 `[B or N, H, D, D]` or None). `chunk_size` only affects the torch path.
    """
    _check_inputs(q, k, v, slopes, cu_seqlens, initial_state)
    if q.is_cuda and _fla_chunk_simple_gla is not None:
        ensure_pinned(q.device)  # once per process: no minutes of autotuning on a known GPU
        o, final = _fla_chunk_simple_gla(
            q, k, v,
            g_gamma=-slopes.float(),
            scale=1.0,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
        )
        return o, final
    return lightning_attention_torch(
        q, k, v, slopes,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        output_final_state=output_final_state,
        chunk_size=chunk_size,
    )


def lightning_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pure-torch chunked lightning attention (any device); same contract as `lightning_attention`."""
    _check_inputs(q, k, v, slopes, cu_seqlens, initial_state)
    if cu_seqlens is None:
        o, final = _chunked(q, k, v, slopes, initial_state, chunk_size)
        return o, (final if output_final_state else None)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [N]
    N, T = lengths.numel(), q.shape[1]
    longest = int(lengths.max())
    if N * longest > 2 * T + N * chunk_size:
        # very uneven lengths: padding would mostly compute zeros; go document by document
        return _per_document(q, k, v, slopes, cu_seqlens, initial_state, output_final_state, chunk_size)
    # Documents become rows of a right-padded batch; `_chunked` stops each row's state at
    # its own length, so padding neither decays the state nor leaks into the next document.
    doc = torch.repeat_interleave(torch.arange(N, device=q.device), lengths)  # [T]
    pos = torch.arange(T, device=q.device) - cu_seqlens.long()[doc]  # [T] position in document

    def to_rows(x: torch.Tensor) -> torch.Tensor:  # [1, T, H, D] -> [N, longest, H, D]
        rows = x.new_zeros(N, longest, *x.shape[2:])
        return rows.index_put((doc, pos), x[0])

    o_rows, final = _chunked(to_rows(q), to_rows(k), to_rows(v), slopes, initial_state, chunk_size, lengths)
    return o_rows[doc, pos][None], (final if output_final_state else None)


def _per_document(q, k, v, slopes, cu_seqlens, initial_state, output_final_state, chunk_size):
    """Packed row, one `_chunked` call per document (exact; slow for many short documents)."""
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        lo, hi = bounds[n], bounds[n + 1]
        s0 = None if initial_state is None else initial_state[n : n + 1]
        o_n, f_n = _chunked(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], slopes, s0, chunk_size)
        outs.append(o_n)
        finals.append(f_n)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    lengths: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence per batch row. Returns (o `[B, T, H, D]`, final state fp32 `[B, H, D, D]`).

    lengths: long `[B]`, valid tokens of each row (the rest is zero padding on the right;
    None = all T). Outputs at padded positions are meaningless; final states are taken at
    each row's own length.

    Within a chunk of length L (positions i, j = 0..L-1) the output is
        o_i = sum_{j<=i} exp(-s (i-j)) (q_i . k_j) v_j  +  exp(-s (i+1)) q_i S_prev
    and the state after the chunk is
        S = exp(-s L) S_prev + sum_j exp(-s (L-1-j)) k_j^T v_j.
    L is per (row, chunk): C, less in a row's last chunk, 0 after it (the state then
    passes unchanged). The masked products run for all chunks at once; only the state
    recurrence over chunks is sequential.
    """
    B, T, H, D = q.shape
    out_dtype = v.dtype
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = max(1, min(chunk_size, T))
    n = (T + C - 1) // C
    pad = n * C - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, n, C, D]
        x = x.to(cdt).transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, n, C, x.shape[-1])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    s = slopes.to(device=q.device, dtype=cdt)  # [H]
    pos = torch.arange(C, device=q.device, dtype=cdt)

    # intra-chunk: causal decay matrix exp(-s (i - j)) for i >= j, 0 above the diagonal
    diff = pos[:, None] - pos[None, :]  # [C, C]
    causal = diff >= 0
    decay = torch.exp(-s[:, None, None] * diff.clamp(min=0)) * causal  # [H, C, C]
    scores = qc @ kc.transpose(-1, -2)  # [B, H, n, C, C]
    o = (scores * decay[:, None]) @ vc  # [B, H, n, C, D]

    # valid tokens per (row, chunk): padding must not decay the state
    valid = torch.full((B,), T, device=q.device, dtype=torch.long) if lengths is None else lengths.to(q.device)
    starts = torch.arange(n, device=q.device) * C
    chunk_len = (valid[:, None] - starts[None, :]).clamp(0, C).to(cdt)  # [B, n]
    key_exp = chunk_len[..., None] - 1 - pos  # [B, n, C]; negative only at padding
    key_decay = torch.exp(-s[None, :, None, None] * key_exp[:, None].clamp(min=0)) * (key_exp[:, None] >= 0)  # [B, H, n, C]
    kv = (kc * key_decay[..., None]).transpose(-1, -2) @ vc  # [B, H, n, D, D]
    block_decay = torch.exp(-s[None, :, None] * chunk_len[:, None, :])  # [B, H, n]

    state = (
        torch.zeros(B, H, D, vc.shape[-1], device=q.device, dtype=cdt)
        if initial_state is None
        else initial_state.to(cdt)
    )
    # unbind once: indexing kv[:, :, c] inside the loop makes autograd materialise a full-size
    # zero gradient of kv per chunk (select backward), O(n^2) work that dominated long rows
    before = []
    for decay_c, kv_c in zip(block_decay.unbind(2), kv.unbind(2)):
        before.append(state)
        state = decay_c[..., None, None] * state + kv_c
    states_before = torch.stack(before, dim=2)  # [B, H, n, D, D]

    query_decay = torch.exp(-s[:, None] * (pos[None, :] + 1))  # [H, C]
    o = o + (qc * query_decay[None, :, None, :, None]) @ states_before

    o = o.reshape(B, H, n * C, -1)[:, :, :T].transpose(1, 2)
    return o.to(out_dtype), state  # state stays fp32 (fp64 for fp64 inputs)


def lightning_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step reference (tests). Computes in q's dtype (use float64 for a tight reference).

    q, k, v `[B, T, H, D]`, slopes `[H]`, initial_state `[B, H, D, D]`. Returns (o, final state).
    """
    B, T, H, D = q.shape
    state = (
        torch.zeros(B, H, D, D, dtype=q.dtype, device=q.device)
        if initial_state is None
        else initial_state.to(q.dtype)
    )
    outs = []
    for t in range(T):
        o_t, state = lightning_step(q[:, t], k[:, t], v[:, t], slopes, state)
        outs.append(o_t)
    return torch.stack(outs, dim=1), state


def lightning_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. q, k, v `[B, H, D]`; state `[B, H, D, D]`. Returns (o `[B, H, D]`, new state).

    Runs in the state's dtype (fp32 for decoding); o is cast back to v's dtype.
    """
    sd = state.dtype
    ratio = torch.exp(-slopes.to(device=state.device, dtype=sd))[None, :, None, None]  # [1, H, 1, 1]
    state = ratio * state + k.to(sd).unsqueeze(-1) * v.to(sd).unsqueeze(-2)
    o = (q.to(sd).unsqueeze(-2) @ state).squeeze(-2)
    return o.to(v.dtype), state


def lightning_step_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One decoding step that updates `state` in place (the decode cache's own tensor).

    q, k, v `[n, H, D]`; state fp32 `[n, H, D, D]` (contiguous). Returns o `[n, H, D]` in v's dtype.
    Same math as `lightning_step`; on CUDA with fla, its fused recurrent kernel (one read
    and one write of the state) plus a copy back, else decay, rank-1 update and readout as
    three batched calls (two in place) with no temporaries of the state's size.
    """
    n, H, D, E = state.shape
    if state.is_cuda and _fla_fused_recurrent is not None:
        o, final = _fla_fused_recurrent(
            q[:, None], k[:, None], v[:, None],
            g_gamma=-slopes.float(), scale=1.0, initial_state=state, output_final_state=True,
        )
        state.copy_(final)
        return o[:, 0].to(v.dtype)
    sd = state.dtype
    state.mul_(torch.exp(-slopes.to(device=state.device, dtype=sd))[None, :, None, None])
    state.addcmul_(k.to(sd).unsqueeze(-1), v.to(sd).unsqueeze(-2))  # + k^T v (faster than a K=1 GEMM)
    o = torch.bmm(q.to(sd).reshape(n * H, 1, D), state.view(n * H, D, E))  # [n*H, 1, E]
    return o.view(n, H, E).to(v.dtype)


def _check_inputs(q, k, v, slopes, cu_seqlens, initial_state) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"lightning_attention: q, k, v must be [B, T, H, D] with equal shapes, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, H, D = q.shape
    if slopes.shape != (H,):
        raise ValueError(f"lightning_attention: slopes must be [H={H}], got {tuple(slopes.shape)}")
    n_states = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"lightning_attention: cu_seqlens needs B == 1 (packed row), got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(
                f"lightning_attention: cu_seqlens must be [N+1] from 0 to T={T}, got {cu_seqlens.tolist()}"
            )
        n_states = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n_states, H, D, v.shape[-1]):
        raise ValueError(
            f"lightning_attention: initial_state must be [{n_states}, {H}, {D}, {v.shape[-1]}], "
            f"got {tuple(initial_state.shape)}"
        )
