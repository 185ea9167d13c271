"""MiniMax-Text-01 hybrid model: lightning + softmax attention layers, top-k MoE, DeepNorm-style
post-norm residuals.

Our own implementation, interchangeable with transformers' `MiniMaxForCausalLM`: same config
(`MiniMaxConfig`, model_type "minimax") and the same on-disk weight names (transformers writes
the original MiniMax layout `block_sparse_moe.experts.{e}.w1/w2/w3`, which we use as module
names directly). Decay tables and RoPE frequencies are computed on the fly, so they are not
saved; transformers rebuilds its decay buffers when loading our files, and we ignore them
when loading transformers' files.

Config extension: `posttrain_fp32_lm_head` (bool, extra config attribute, saved in
config.json and ignored by transformers) selects an fp32 LM head; see `lm_head_fp32`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import MiniMaxConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from posttrain.models.lightning import lightning_attention, lightning_slopes, lightning_step, lightning_step_
from posttrain.models.varlen import positions_from_cu_seqlens

LINEAR, FULL = "linear_attention", "full_attention"


def lm_head_fp32(config) -> bool:
    """Whether the LM head runs in fp32 (our extra config attribute; absent = False)."""
    return bool(vars(config).get("posttrain_fp32_lm_head", False))


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a lean backward: saves x (input dtype) and rstd (fp32 `[..., 1]`) only.

    Plain autograd over the same expression keeps two fp32 copies of x per norm (for `pow`
    and for the product with rstd): 6 GiB per norm at 1M tokens x 768 in a training step,
    three norms per layer. The forward is the same expression, so outputs are bit-identical;
    the backward is the analytic gradient, equal to autograd's up to rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # [..., D] fp32, as in forward
        grad_w = None
        if ctx.needs_input_grad[1]:  # d(w * y)/dw summed over tokens, y = xhat in the input dtype
            grad_w = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:  # dx = rstd * (g - xhat * mean(g * xhat)), g = dL/dy in fp32
            g = (grad * weight).float()
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps); statistics in fp32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(config: MiniMaxConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """Default RoPE over the full head dim. position_ids `[B, T]` -> cos, sin `[B, T, D]` in `dtype`."""
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.rope_parameters.rope_type={rope['rope_type']!r}: only 'default' is supported")
    d = _head_dim(config)
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, device=position_ids.device).float() / d))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, H, T, D]`, cos/sin `[B, T, D]` (rotate-half convention)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _head_dim(config: MiniMaxConfig) -> int:
    return config.head_dim or config.hidden_size // config.num_attention_heads


@dataclass
class LayerContext:
    """Per-forward inputs shared by all layers (not parameters, not cached)."""

    cos: torch.Tensor  # [B, T, D]
    sin: torch.Tensor  # [B, T, D]
    softmax_mask: Optional[torch.Tensor]  # bool [B or 1, 1, T, T]; None = causal (per document with cu_seqlens)
    token_mask: Optional[torch.Tensor]  # [B, T] 1 = real token (padding zeroes lightning q/k/v)
    cu_seqlens: Optional[torch.Tensor]  # int32 [N+1] (B == 1) or None
    return_state: bool = False
    chunk_size: int = 64


class LightningAttention(nn.Module):
    """silu(qkv) -> decayed linear attention -> RMSNorm over heads -> sigmoid gate -> out_proj."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.num_layers = layer_idx, config.num_hidden_layers
        self.num_heads, self.head_dim = config.num_attention_heads, _head_dim(config)
        inner = self.num_heads * self.head_dim
        self.act = ACT2FN[config.hidden_act]
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.norm = RMSNorm(inner, eps=1e-6)  # transformers uses the norm's default eps here

    def slopes(self, device) -> torch.Tensor:
        return lightning_slopes(self.num_heads, self.layer_idx, self.num_layers, device=device)

    def _qkv(self, x: torch.Tensor):  # x [..., hidden] -> q, k, v [..., H, D]
        qkv = self.act(self.qkv_proj(x))
        qkv = qkv.reshape(*x.shape[:-1], self.num_heads, 3 * self.head_dim)
        return qkv.split(self.head_dim, dim=-1)

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:  # o [..., H, D]
        o = self.norm(o.reshape(*o.shape[:-2], -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o)

    def forward(self, x: torch.Tensor, ctx: LayerContext):
        """x `[B, T, hidden]` -> (out `[B, T, hidden]`, final state fp32 `[B or N, H, D, D]` or None)."""
        q, k, v = self._qkv(x)  # [B, T, H, D]
        if ctx.token_mask is not None:
            m = ctx.token_mask[:, :, None, None].to(q.dtype)
            q, k, v = q * m, k * m, v * m
        o, state = lightning_attention(
            q, k, v, self.slopes(x.device),
            cu_seqlens=ctx.cu_seqlens, output_final_state=ctx.return_state, chunk_size=ctx.chunk_size,
        )
        return self._output(x, o), state

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """Decode one token per row. x `[S, hidden]`, state fp32 `[S, H, D, D]` -> (out `[S, hidden]`, new state)."""
        q, k, v = self._qkv(x)  # [S, H, D]
        o, state = lightning_step(q, k, v, self.slopes(x.device), state)
        return self._output(x, o), state

    def step_(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Like `step` but updates `state` (fp32 `[S, H, D, D]`, contiguous) in place. Returns out `[S, hidden]`."""
        q, k, v = self._qkv(x)  # [S, H, D]
        o = lightning_step_(q, k, v, self.slopes(x.device), state)
        return self._output(x, o)


def _no_cudnn_sdpa(q: torch.Tensor):
    """SDPA without its cuDNN backend on CUDA (flash, memory-efficient or math: whichever takes
    the inputs); a no-op elsewhere. cuDNN builds an execution plan for every new shape, and
    our shapes change all the time: a decode step's key length, an RL micro-batch's width,
    each packed document's length. Measured: ~40 ms of host time per decode-step call on an
    H100; 5 ms per forward and 10 ms per backward call in an RL micro-batch on an H200 (profile
    of benchmarks/rl_learner_gpu.py). Fixed-shape long-context training gives up cuDNN's
    kernel, which docs/gpu.md's 128K-1M training table used (not re-measured)."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class SoftmaxAttention(nn.Module):
    """Multi-head (GQA) softmax attention with RoPE; scale 1/sqrt(D)."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = _head_dim(config)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x `[B, T, hidden]` -> q `[B, H, T, D]`, k, v `[B, Hkv, T, D]` (RoPE applied to q, k)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        """q `[B, H, Tq, D]`, k, v `[B, Hkv, Tk, D]`, mask bool broadcastable to `[B, H, Tq, Tk]` -> `[B, Tq, hidden]`."""
        # GQA inside SDPA: no repeated copy of k, v (query head h reads kv head h // (H / Hkv)).
        # On CUDA, where cuDNN is off (_no_cudnn_sdpa), k and v are repeated instead: flash and
        # memory-efficient then take them whatever their enable_gqa support, and a masked or long
        # call never lands on the math kernel (quadratic memory) for want of it.
        gqa = self.num_kv != self.num_heads
        if gqa and q.is_cuda:
            rep = self.num_heads // self.num_kv
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        with _no_cudnn_sdpa(q):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                               enable_gqa=gqa)
        B, _, Tq, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, Tq, -1))

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoding: one query per row. q `[n, H, 1, D]`, k, v `[n, Hkv, L, D]` (may be strided views
        of a cache), mask bool `[n, L]` -> `[n, hidden]`.

        The H / Hkv query heads that share a kv head become that head's query rows, so the
        cache is read as is (no repeat, no copy) by any SDPA backend."""
        n, H, _, D = q.shape
        qg = q.reshape(n, self.num_kv, H // self.num_kv, D)  # head h = kv * rep + r
        with _no_cudnn_sdpa(q):
            o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :])
        return self.o_proj(o.reshape(n, H * D))

    def forward(self, x: torch.Tensor, ctx: LayerContext):
        """x `[B, T, hidden]` -> (out, (k, v) after RoPE `[B, Hkv, T, D]` when ctx.return_state else None)."""
        q, k, v = self.project(x, ctx.cos, ctx.sin)
        if ctx.cu_seqlens is not None:
            out = self.attend_documents(q, k, v, ctx.cu_seqlens)
        else:
            out = self.attend(q, k, v, ctx.softmax_mask, is_causal=True)
        return out, ((k, v) if ctx.return_state else None)

    def attend_documents(self, q, k, v, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Packed row (B == 1): causal attention inside each document of cu_seqlens `[N+1]`.

        One causal SDPA call per document instead of one call with a dense block-diagonal
        `[T, T]` mask: a mask sends SDPA to its math path, whose memory is quadratic in the
        row length (32K tokens: a 1 GB mask plus 8 GB of fp32 scores); per document the
        fused causal kernels keep memory linear and skip the cross-document blocks.
        """
        bounds = cu_seqlens.tolist()
        outs = [self.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], None, is_causal=True)
                for lo, hi in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, dim=1)


class Expert(nn.Module):
    """SwiGLU feed-forward: w2(act(w1 x) * w3 x)."""

    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class _GroupedMM(torch.autograd.Function):
    """x `[m, in]` @ w[g] `[in, out]` for the rows of group g (rows ends[g-1]:ends[g]) -> `[m, out]`.
    A Function of its own because `torch._grouped_mm`'s autograd rejects zero-stride gradients."""

    @staticmethod
    def forward(ctx, x, w, ends):
        ctx.save_for_backward(x, w, ends)
        return torch._grouped_mm(x, w, offs=ends)

    @staticmethod
    def backward(ctx, grad):
        x, w, ends = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch._grouped_mm(grad, w.transpose(-2, -1), offs=ends) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(x.t(), grad, offs=ends) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], ends: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (`ends` int32 `[E]`, cumulative) through each expert's Linear
    weight `[out, in]`: `[m, in]` -> `[m, out]`, one kernel for all experts."""
    return _GroupedMM.apply(x, torch.stack(weights).transpose(-2, -1), ends)


class SparseMoE(nn.Module):
    """Top-k routing (softmax over all experts, top-k renormalised), no shared expert.

    Rows longer than `token_chunk` tokens go through the experts in slices of that many
    tokens; while autograd records, each slice is checkpointed (recomputed in backward), so
    the experts' activations (~17 GiB per layer at 1M tokens x 768) exist for one slice at a
    time. Routing is per token, so slicing changes nothing but the matmul row blocking.
    """

    token_chunk: int = 262144
    grouped_gemm: Optional[bool] = None  # see `grouped`; None = auto

    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__()
        self.top_k, self.jitter = config.num_experts_per_tok, config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))

    def forward(self, x: torch.Tensor):
        """x `[..., hidden]` -> (y `[..., hidden]`, router logits `[N, E]` with N = tokens)."""
        shape = x.shape
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = x.reshape(-1, shape[-1])  # [N, hidden]
        logits, weights, chosen = self.route(flat)
        N, C = flat.shape[0], self.token_chunk
        if N <= C:
            return self.mix(flat, weights, chosen).reshape(shape), logits
        record = torch.is_grad_enabled()
        outs = [
            checkpoint(self.mix, flat[lo : lo + C], weights[lo : lo + C], chosen[lo : lo + C], use_reentrant=False)
            if record else self.mix(flat[lo : lo + C], weights[lo : lo + C], chosen[lo : lo + C])
            for lo in range(0, N, C)
        ]
        return torch.cat(outs).reshape(shape), logits

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flat `[N, hidden]` -> (router logits `[N, E]`, top-k weights fp32 renormalised and
        expert ids `[N, k]`)."""
        logits = self.gate(flat)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), chosen

    def grouped(self, flat: torch.Tensor) -> bool:
        """Whether `mix` runs all experts as three grouped GEMMs (`torch._grouped_mm`). Needs plain
        `nn.Linear` experts (not LoRA-wrapped). `grouped_gemm` None (auto) = on a CUDA GPU of
        compute capability 9.0+ in bf16, the case its CUDA kernel covers; on the CPU it measured
        slower than the per-expert loop (62.7 vs 55.9 ms fwd+bwd, tiny-hybrid, 8K assignments)."""
        if not hasattr(torch, "_grouped_mm") or not all(
            type(e.w1) is nn.Linear and type(e.w2) is nn.Linear and type(e.w3) is nn.Linear for e in self.experts
        ):
            return False
        if self.grouped_gemm is not None:
            return self.grouped_gemm
        return (flat.device.type == "cuda" and flat.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(flat.device)[0] >= 9)

    def mix(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """sum_k weights[n, k] * expert_{chosen[n, k]}(flat[n]). flat `[n, hidden]`, weights fp32
        and chosen `[n, k]` -> `[n, hidden]` in flat's dtype."""
        # Group the n*k (token, expert) assignments by expert with one sort, so each expert
        # runs once on a contiguous slice; expert outputs are weighted in fp32 (as
        # transformers does) one expert at a time, never as one fp32 [n*k, hidden] tensor.
        assigned = chosen.reshape(-1)  # [n*k]
        order = torch.argsort(assigned, stable=True)  # by expert, then token: same sum order as a per-expert loop
        tok = order // self.top_k  # [n*k] token of each sorted assignment
        w = weights.reshape(-1)[order, None]  # [n*k, 1] fp32
        out = torch.zeros_like(flat)
        if self.grouped(flat):
            # No host sync and ~10 launches per layer instead of ~10 per expert: the group
            # offsets stay on the device (counted with scatter_add_: CUDA's bincount reads the
            # largest id back to size its output). Same sorted order, so the same sum order on the CPU.
            counts = torch.zeros(len(self.experts), dtype=torch.long, device=flat.device)
            ends = torch.cumsum(counts.scatter_add_(0, assigned, torch.ones_like(assigned)), 0).to(torch.int32)
            xs = flat.index_select(0, tok)  # [n*k, hidden]
            e0 = self.experts[0]
            h = e0.act(_grouped_linear(xs, [e.w1.weight for e in self.experts], ends)) * _grouped_linear(
                xs, [e.w3.weight for e in self.experts], ends)
            y = _grouped_linear(h, [e.w2.weight for e in self.experts], ends)
            return out.index_add_(0, tok, (y * w).to(flat.dtype))
        counts = torch.bincount(assigned, minlength=len(self.experts)).tolist()
        lo = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            idx = tok[lo : lo + count]
            y = (self.experts[e](flat.index_select(0, idx)) * w[lo : lo + count]).to(flat.dtype)
            out.index_add_(0, idx, y)  # expert order per token, as one index_add over the sort
            lo += count
        return out


class DecoderLayer(nn.Module):
    """h = norm1(h); h = alpha_a * h + beta_a * attn(h); h = norm2(h); h = alpha_m * h + beta_m * moe(h)."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == LINEAR:
            self.self_attn = LightningAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        elif self.layer_type == FULL:
            self.self_attn = SoftmaxAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        else:
            raise ValueError(f"config.layer_types[{layer_idx}]={self.layer_type!r}: expected {LINEAR!r} or {FULL!r}")
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(config)
        self.gradient_checkpointing = False  # HF's gradient_checkpointing_enable() flips this too

    def residual_attn(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        return h * self.attn_alpha + attn_out * self.attn_beta

    def feed_forward(self, h: torch.Tensor):
        """Post-attention half of the layer. Returns (h, router logits)."""
        h = self.post_attention_layernorm(h)
        y, router_logits = self.block_sparse_moe(h)
        return h * self.mlp_alpha + y * self.mlp_beta, router_logits

    def forward(self, h: torch.Tensor, ctx: LayerContext):
        """h `[B, T, hidden]` -> (h, router logits `[B*T, E]`, attention state or None)."""
        h = self.input_layernorm(h)
        attn_out, state = self.self_attn(h, ctx)
        h, router_logits = self.feed_forward(self.residual_attn(h, attn_out))
        return h, router_logits, state


@dataclass
class HybridOutput:
    hidden: torch.Tensor  # [B, T, hidden] after the final norm
    router_logits: list[torch.Tensor]  # per layer [B*T, E]
    states: Optional[list]  # per layer: lightning fp32 state or softmax (k, v); None unless asked


class HybridModel(nn.Module):
    """Embedding, decoder layers, final norm (weights under the `model.` prefix)."""

    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__()
        if len(config.layer_types) != config.num_hidden_layers:
            raise ValueError(
                f"config.layer_types has {len(config.layer_types)} entries, num_hidden_layers={config.num_hidden_layers}"
            )
        self.config = config
        # No padding_idx: its row would start (and stay) exactly zero, and a zero vector through
        # the first RMSNorm has a Jacobian of 1/sqrt(eps) ~ 300 per norm. A pad token sampled
        # inside an RL completion then blew gradients up to inf within a few layers. Loading
        # transformers' checkpoints is unaffected (the row is just a weight).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        return_states: bool = False,
        chunk_size: int = 64,
    ) -> HybridOutput:
        """input_ids `[B, T]`; position_ids `[B, T]` (RoPE only); cu_seqlens int32 `[N+1]` (B == 1,
        see posttrain.models.varlen); attention_mask `[B, T]` 1 = token, 0 = padding."""
        B, T = input_ids.shape
        if cu_seqlens is not None and (B != 1 or attention_mask is not None):
            raise ValueError(f"cu_seqlens needs a single packed row (B == 1, got {B}) and no attention_mask")
        if position_ids is None:
            position_ids = (
                positions_from_cu_seqlens(cu_seqlens)
                if cu_seqlens is not None
                else torch.arange(T, device=input_ids.device)[None].expand(B, T)
            )
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, position_ids, h.dtype)
        ctx = LayerContext(
            cos=cos, sin=sin,
            softmax_mask=_softmax_mask(cu_seqlens, attention_mask, T, h.device),
            token_mask=attention_mask, cu_seqlens=cu_seqlens,
            return_state=return_states, chunk_size=chunk_size,
        )
        router_logits, states = [], []
        for layer in self.layers:
            if layer.gradient_checkpointing and torch.is_grad_enabled():
                h, logits, state = checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h, logits, state = layer(h, ctx)
            router_logits.append(logits)
            states.append(state)
        return HybridOutput(self.norm(h), router_logits, states if return_states else None)


def _softmax_mask(cu_seqlens, attention_mask, T: int, device) -> Optional[torch.Tensor]:
    if cu_seqlens is not None or attention_mask is None:  # packed rows: per-document causal SDPA
        return None
    t = torch.arange(T, device=device)
    causal = t[None, :] <= t[:, None]  # [T, T]
    # a padded query still sees itself, so its softmax row is never empty (no NaN)
    keys = attention_mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=device)
    return causal[None, None] & keys


def router_aux_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int, token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss (unscaled), same definition as transformers'
    `load_balancing_loss_func`: E * sum_e f_e * P_e with f_e = top-k assignments to e per token and
    P_e = mean router probability of e, both averaged over all (unmasked) tokens of all layers.

    router_logits: per layer `[N, E]`; token_mask: `[N]` or `[B, T]` (1 = counted) or None.
    """
    dev = router_logits[0].device
    counts = torch.zeros(num_experts, device=dev)
    prob_sum = torch.zeros(num_experts, device=dev)
    w = None if token_mask is None else token_mask.reshape(-1).to(device=dev, dtype=torch.float32)
    rows = torch.zeros((), device=dev)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        ww = torch.ones(probs.shape[0], device=dev) if w is None else w
        counts = counts.index_add(0, chosen.reshape(-1), ww.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * ww[:, None]).sum(0)
        rows = rows + ww.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


class HybridForCausalLM(PreTrainedModel):
    """Our MiniMax-Text-01 causal LM; saves/loads the same files as transformers' MiniMaxForCausalLM."""

    config_class = MiniMaxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True  # softmax layers always use torch SDPA; lets configs that say "sdpa" load
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers persists its precomputed decay tables; we recompute them on the fly
    _keys_to_ignore_on_load_unexpected = [r"self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$"]

    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "HybridForCausalLM":
        """transformers' loading, then `fill_zero_embeddings` (checkpoints that other code wrote)."""
        model = super().from_pretrained(*args, **kwargs)
        model.fill_zero_embeddings()
        return model

    @torch.no_grad()
    def fill_zero_embeddings(self) -> int:
        """Give input-embedding rows that are exactly zero small random values, N(0,
        initializer_range) from a fixed seed (the same on every rank and every load); returns
        how many rows changed.

        An all-zero row is what `nn.Embedding(padding_idx=...)` leaves at the pad id (transformers'
        MiniMaxForCausalLM, and any checkpoint saved from it without training that row). The zero
        vector is a fixed point of every lightning layer here: RMSNorm(0) = 0, silu(W 0) = 0 so
        q = k = v = 0 and the attention output is 0, the output norm and the MoE map 0 to 0.
        RMSNorm's derivative at 0 is w / sqrt(eps) (~316 for the layer norms, ~1000 for the
        lightning output norm), so a sampled pad token *inside* a completion (a real,
        attended token) multiplies its gradient by ~1e8 per lightning layer and the backward
        overflows fp32 (grad norm inf/nan at the first rl step). Padding *after* a completion
        is masked and receives no gradient, so it was never the problem. A trained row is
        never exactly zero, so only never-trained rows change; the preset models start
        without padding_idx and are unaffected.
        """
        weight = self.get_input_embeddings().weight
        zero = (weight == 0).all(dim=-1).nonzero().flatten()
        if zero.numel():
            g = torch.Generator().manual_seed(0)
            std = float(self.config.initializer_range)
            fill = torch.randn(zero.numel(), weight.shape[-1], generator=g) * std
            weight[zero] = fill.to(device=weight.device, dtype=weight.dtype)
        return int(zero.numel())

    def get_correct_experts_implementation(self, requested_experts: Optional[str]) -> str:
        # SparseMoE has a single (per-expert loop) implementation; a config that transformers
        # prepared may request another one, which we accept and ignore
        return "eager"

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (fp32 when the config says so). hidden `[..., hidden]` -> logits `[..., V]`."""
        if lm_head_fp32(self.config):
            return F.linear(hidden.float(), self.lm_head.weight.float())
        return self.lm_head(hidden)

    def aux_loss(self, router_logits: list[torch.Tensor], token_mask=None) -> torch.Tensor:
        """router_aux_loss_coef * load-balancing loss (0-dim tensor)."""
        c = self.config
        return c.router_aux_loss_coef * router_aux_loss(router_logits, c.num_local_experts, c.num_experts_per_tok, token_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        output_router_logits: Optional[bool] = None,
        logits_to_keep: int = 0,
        **_: object,
    ) -> MoeCausalLMOutputWithPast:
        """HF-style forward (logits for every position). `loss` = mean next-token NLL over labels != -100,
        plus coef * aux when router logits are requested; `aux_loss` is the *unscaled* balancing loss
        (as in transformers)."""
        out = self.model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        logits = self.logits(out.hidden[:, -logits_to_keep:] if logits_to_keep else out.hidden)
        aux = None
        if want_router:
            c = self.config
            aux = router_aux_loss(out.router_logits, c.num_local_experts, c.num_experts_per_tok, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux, logits=logits,
            router_logits=tuple(out.router_logits) if want_router else None,
        )
