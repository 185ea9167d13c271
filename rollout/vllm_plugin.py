"""Our vLLM model plugin: the MiniMax-Text-01 hybrid (posttrain.models.HybridForCausalLM) served
by vLLM. Loaded by vLLM through the `vllm.general_plugins` entry point (pyproject.toml), so a
plain `vllm serve <one of our checkpoints>` works too; posttrain's vllm engine also calls
`register()` itself.

What it registers: the architectures `HybridForCausalLM` (what our checkpoints' config.json
names) and `MiniMaxForCausalLM` (the same files written by transformers) -> `MiniMaxHybridForCausalLM`.
Config, module and weight names are those of posttrain.models.hybrid; the modules are ours
(projections, RMSNorms, MoE routing, DeepNorm residuals), so vLLM runs exactly our layers and
loads checkpoint tensors by name without any remapping. What vLLM owns:

- lightning layers are vLLM "mamba-like" layers (`MambaBase`, `LinearAttentionBackend`): vLLM's
  hybrid-state manager gives every running sequence one fixed-size fp32 state `[H, D, D]` per
  layer (our DecodeCache's state); the layer reads/writes it at `state_indices_tensor`.
  Prefill (also a chunk of a longer prompt: chunked prefill continues from the saved state) runs
  posttrain.models.lightning.lightning_attention over the packed requests (`cu_seqlens`);
  decode steps run `lightning_step`. On CPU both are our chunked / recurrent torch code; on CUDA
  `lightning_attention` dispatches to fla's chunk_simple_gla when installed (vLLM's own
  `lightning_attn` Triton kernels use MiniMax's block layout; not wired here).
- softmax layers use vLLM's `Attention` (its paged KV cache and the platform's backend) with
  vLLM's RoPE (neox / rotate-half over the full head dim, as ours).
- the LM head runs in fp32 when the checkpoint says `posttrain_fp32_lm_head` (MiniMax-M1).

Limits: tensor parallel size 1 (plain linear layers, no sharding); prefix caching off for this
model (the engine disables it: vLLM's hybrid prefix caching needs per-block state copies).
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.hybrid import (
    FULL, LINEAR, LightningAttention, RMSNorm, SoftmaxAttention, SparseMoE, _head_dim, lm_head_fp32,
)
from posttrain.models.lightning import lightning_attention, lightning_step

ARCHITECTURES = ("HybridForCausalLM", "MiniMaxForCausalLM")
# lightning chunk of the prefill, as HybridModel.forward's default (numerics match native's prefill)
CHUNK = 64
# tensors transformers saves for its own decay tables; we recompute them (as HybridForCausalLM does)
_IGNORED_SUFFIXES = (".slope_rate", ".query_decay", ".key_decay", ".diagonal_decay")


def register() -> None:
    """Register our architectures with vLLM's ModelRegistry (the entry point; idempotent)."""
    from vllm import ModelRegistry

    # the class itself, not a lazy "module:Class" string: vLLM would inspect a string-registered
    # model in a subprocess (~10-20 s on a 2-core CPU, whenever this file changes); building the
    # class imports vLLM's layer modules, nothing touches a device
    model_cls = _model_cls()
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, model_cls)


def _vllm_classes():
    # vLLM imports stay inside functions: importing this module (e.g. for ARCHITECTURES) must not
    # need vLLM; the classes below are built on first use
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

    return MambaBase, HasInnerState, IsHybrid


def _metadata(prefix: str):
    """This layer's attention metadata of the current forward, or None (profiling / dummy runs)."""
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    return meta.get(prefix) if isinstance(meta, dict) else None


@functools.cache
def _lightning_cls():
    MambaBase, _, _ = _vllm_classes()
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    class VLLMLightning(LightningAttention, MambaBase):
        """Our LightningAttention (same weights, same math) with its state in vLLM's cache."""

        def __init__(self, config, layer_idx: int, prefix: str, vllm_config) -> None:
            LightningAttention.__init__(self, config, layer_idx)
            self.prefix = prefix
            compilation = vllm_config.compilation_config
            if prefix in compilation.static_forward_context:
                raise ValueError(f"duplicate layer name {prefix}")
            compilation.static_forward_context[prefix] = self  # vLLM finds cache users here

        @property
        def mamba_type(self):
            return MambaAttentionBackendEnum.LINEAR

        def get_state_shape(self):
            return ((self.num_heads, self.head_dim, self.head_dim),)

        def get_state_dtype(self):
            return (torch.float32,)  # the state is fp32 whatever the weights are (as our DecodeCache)

        def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            """x `[N, hidden]` (decode tokens first, then the prefill requests' tokens) -> `[N, hidden]`."""
            meta = _metadata(self.prefix)
            if meta is None:  # a dummy run: shapes only
                return self._output(x, torch.zeros(*x.shape[:-1], self.num_heads, self.head_dim, dtype=x.dtype))
            n = meta.num_decode_tokens + meta.num_prefill_tokens
            q, k, v = self._qkv(x[:n])  # [n, H, D]
            o = torch.empty_like(v)
            cache = self.kv_cache[0]  # [slots, H, D, D] fp32
            slopes = self.slopes(x.device)
            nd, npf = meta.num_decodes, meta.num_prefills
            if nd:  # one token each, state in place
                idx = meta.state_indices_tensor[:nd].long()
                o[:nd], cache[idx] = lightning_step(q[:nd], k[:nd], v[:nd], slopes, cache[idx])
            if npf:
                starts = meta.query_start_loc[nd:nd + npf + 1].long()  # [P+1] token offsets
                idx = meta.state_indices_tensor[nd:nd + npf].long()
                computed = meta.seq_lens[nd:nd + npf].long() - (starts[1:] - starts[:-1])  # tokens before this chunk
                # a new sequence starts from zeros (its slot may hold a finished sequence's state)
                initial = cache[idx] * (computed > 0).to(cache.dtype)[:, None, None, None]
                lo = int(starts[0])
                o_p, final = lightning_attention(
                    q[None, lo:n], k[None, lo:n], v[None, lo:n], slopes, cu_seqlens=(starts - lo).to(torch.int32),
                    initial_state=initial, output_final_state=True, chunk_size=CHUNK,
                )
                o[lo:n], cache[idx] = o_p[0], final
            out = self._output(x[:n], o)
            return out if n == x.shape[0] else torch.cat([out, out.new_zeros(x.shape[0] - n, out.shape[-1])])

    return VLLMLightning


class _VLLMSoftmax(SoftmaxAttention):
    """Our SoftmaxAttention's projections, vLLM's RoPE and paged attention."""

    def __init__(self, config, layer_idx: int, prefix: str, vllm_config) -> None:
        super().__init__(config, layer_idx)
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.rotary_embedding import get_rope

        self.rotary = get_rope(self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                               rope_parameters=config.rope_parameters)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        q, k = self.rotary(positions, self.q_proj(x), self.k_proj(x))
        return self.o_proj(self.attn(q, k, self.v_proj(x)))


class _VLLMLayer(nn.Module):
    """posttrain.models.hybrid.DecoderLayer over flat `[N, hidden]` tokens (same names, same math)."""

    def __init__(self, config, layer_idx: int, prefix: str, vllm_config) -> None:
        super().__init__()
        kind = config.layer_types[layer_idx]
        if kind == LINEAR:
            self.self_attn = _lightning_cls()(config, layer_idx, f"{prefix}.self_attn", vllm_config)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        elif kind == FULL:
            self.self_attn = _VLLMSoftmax(config, layer_idx, f"{prefix}.self_attn", vllm_config)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        else:
            raise ValueError(f"config.layer_types[{layer_idx}]={kind!r}: expected {LINEAR!r} or {FULL!r}")
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(config)

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(h)
        h = h * self.attn_alpha + self.self_attn(h, positions) * self.attn_beta
        h = self.post_attention_layernorm(h)
        y, _ = self.block_sparse_moe(h)
        return h * self.mlp_alpha + y * self.mlp_beta


class _VLLMModel(nn.Module):
    def __init__(self, config, prefix: str, vllm_config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_VLLMLayer(config, i, f"{prefix}.layers.{i}", vllm_config)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@functools.cache
def _model_cls():
    _, HasInnerState, IsHybrid = _vllm_classes()
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator

    class MiniMaxHybridForCausalLM(nn.Module, HasInnerState, IsHybrid):
        """vLLM's view of posttrain.models.HybridForCausalLM (see the module docstring)."""

        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__()
            config = vllm_config.model_config.hf_config
            if vllm_config.parallel_config.tensor_parallel_size != 1:
                raise ValueError("posttrain's vLLM plugin supports tensor_parallel_size=1 only")
            self.config = config
            self.model = _VLLMModel(config, "model", vllm_config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
            self.train(False)  # our SparseMoE jitters router inputs in training mode

        def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model.embed_tokens(input_ids)

        def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                    intermediate_tensors=None, inputs_embeds: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
            """input_ids `[N]` (all scheduled tokens of all requests, flat), positions `[N]` -> hidden `[N, hidden]`."""
            h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            for layer in self.model.layers:
                h = layer(h, positions)
            return self.model.norm(h)

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            """`[N, hidden]` -> `[N, V]`; fp32 when the checkpoint asks for an fp32 LM head."""
            if lm_head_fp32(self.config):
                return F.linear(hidden.float(), self.lm_head.weight.float())
            return self.lm_head(hidden)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            """Checkpoint tensors by name (our names are vLLM's names here), through each
            parameter's `weight_loader` when vLLM attached one (its layerwise reload does)."""
            from vllm.model_executor.model_loader.weight_utils import default_weight_loader

            params = dict(self.named_parameters())
            loaded = set()
            with torch.no_grad():
                for name, tensor in weights:
                    if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                        continue
                    if name not in params:
                        raise KeyError(f"posttrain vLLM plugin: no parameter named {name!r}")
                    if params[name].shape != tensor.shape:
                        raise ValueError(f"posttrain vLLM plugin: {name!r} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(params[name].shape)}")
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(name)
            return loaded

        @classmethod
        def get_mamba_state_shape_from_config(cls, vllm_config):
            config = vllm_config.model_config.hf_config
            d = _head_dim(config)
            return ((config.num_attention_heads, d, d),)

        @classmethod
        def get_mamba_state_dtype_from_config(cls, vllm_config):
            return (torch.float32,)

        @classmethod
        def get_mamba_state_copy_func(cls):
            return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()

    return MiniMaxHybridForCausalLM


def __getattr__(name: str):
    # `posttrain.rollout.vllm_plugin:MiniMaxHybridForCausalLM` is what the registry imports
    if name == "MiniMaxHybridForCausalLM":
        return _model_cls()
    raise AttributeError(name)
