"""Models: our MiniMax-Text-01 hybrid (lightning + softmax attention, MoE) and any HF causal LM.

Building / loading:
    build_model(cfg, *, vocab_size=None, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        preset (tiny architectures from scratch, see PRESETS) or path (delegates to load_model).
        The tokenizer decides the vocabulary: pass vocab_size and special ids (they override
        the preset's defaults; for a path they are checked against the checkpoint).
    load_model(path, cfg): config.json model_type "minimax" -> HybridForCausalLM, anything else
        -> transformers.AutoModelForCausalLM (never remote code).
    Saving: `model.save_pretrained(dir)` (config.json + model.safetensors); the files load in
    plain transformers as MiniMaxForCausalLM.

Our one config extension: `config.posttrain_fp32_lm_head` (bool), set from ModelConfig.fp32_lm_head
by build_model/load_model on every model, ours or HF; it travels in config.json.

Training entry points: forward_hidden, token_logprobs, set_gradient_checkpointing (logprobs.py).
Decoding for the native engine: posttrain.models.decode. Packed rows: posttrain.models.varlen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MiniMaxConfig

from posttrain.config import ModelConfig
from posttrain.models.hybrid import FULL, LINEAR, HybridForCausalLM, lm_head_fp32, router_aux_loss
from posttrain.models.logprobs import forward_hidden, set_gradient_checkpointing, token_logprobs

__all__ = [
    "PRESETS",
    "Preset",
    "build_model",
    "load_model",
    "preset_config",
    "HybridForCausalLM",
    "forward_hidden",
    "token_logprobs",
    "set_gradient_checkpointing",
    "lm_head_fp32",
    "router_aux_loss",
]


@dataclass(frozen=True)
class Preset:
    """A from-scratch architecture: MiniMaxConfig keys plus the layer pattern.

    Layer i is softmax attention when (i + 1) % softmax_every == 0, else lightning
    (MiniMax-Text-01: softmax_every = 8; 1 = all softmax).
    """

    config: dict[str, Any]
    softmax_every: int = 8
    about: str = ""


_TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=8,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64,
    num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.001,
    max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    block_size=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
)

PRESETS: dict[str, Preset] = {
    "tiny-hybrid": Preset(dict(_TINY), 8, "~3.1M params: 7 lightning + 1 softmax layer, 4 experts top-2 (CPU)"),
    "tiny-softmax": Preset(dict(_TINY), 1, "tiny-hybrid with every layer softmax attention (benchmarks)"),
    "small-hybrid": Preset(
        dict(
            _TINY, vocab_size=32000, hidden_size=768, intermediate_size=512, num_hidden_layers=16,
            num_attention_heads=6, num_key_value_heads=2, head_dim=128, num_local_experts=8,
            max_position_embeddings=131072, block_size=256,
        ),
        8,
        "~250M params: 2 blocks of 7 lightning + 1 softmax, 8 experts top-2 (GPU benchmarks)",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_config(
    name: str, overrides: Optional[dict[str, Any]] = None, *, fp32_lm_head: bool = True, **token_ids: Any
) -> MiniMaxConfig:
    """MiniMaxConfig of preset `name`, with `token_ids` (vocab_size, pad/bos/eos_token_id) and then
    `overrides` applied. layer_types follows the preset pattern over the final num_hidden_layers
    unless overridden; the post-norm alpha factors default to DeepNorm's (2 L)^(1/4) (as in
    MiniMax-Text-01), betas to 1."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}: unknown preset, expected one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    overrides = dict(overrides or {})
    known = MiniMaxConfig().to_dict()
    for key in overrides:
        if key not in known:
            raise ValueError(f"model.overrides.{key}: not a MiniMaxConfig key")
    kw = {**preset.config, **{k: v for k, v in token_ids.items() if v is not None}, **overrides}
    n = kw["num_hidden_layers"]
    kw.setdefault(
        "layer_types", [FULL if (i + 1) % preset.softmax_every == 0 else LINEAR for i in range(n)]
    )
    alpha = (2.0 * n) ** 0.25
    for part in ("full_attn", "linear_attn", "mlp"):
        kw.setdefault(f"{part}_alpha_factor", alpha)
        kw.setdefault(f"{part}_beta_factor", 1.0)
    return MiniMaxConfig(**kw, posttrain_fp32_lm_head=fp32_lm_head)


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int | list[int]] = None,
) -> nn.Module:
    """A fresh preset model (weights from torch's global RNG: seed before calling) or the
    checkpoint at cfg.path, in cfg.dtype, eval mode (call .train()), checkpointing as cfg says."""
    if (cfg.preset is None) == (cfg.path is None):
        raise ValueError(f"model: set exactly one of preset or path (got preset={cfg.preset!r}, path={cfg.path!r})")
    if cfg.path is not None:
        model = load_model(cfg.path, cfg)
        have = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > have:
            raise ValueError(f"model.path={cfg.path}: tokenizer has {vocab_size} tokens, embeddings only {have}")
        return model
    config = preset_config(
        cfg.preset, cfg.overrides, fp32_lm_head=cfg.fp32_lm_head, vocab_size=vocab_size,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    model = HybridForCausalLM(config).to(_DTYPES[cfg.dtype])
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    return model.eval()


def load_model(path: str | Path, cfg: ModelConfig) -> nn.Module:
    """Load a Hugging Face causal-LM directory: ours for model_type "minimax", else AutoModelForCausalLM.

    cfg.overrides must name existing config keys; cfg.dtype, fp32_lm_head and
    gradient_checkpointing apply to either kind. Returns the model in eval mode.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json (not a Hugging Face model directory)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    config = AutoConfig.from_pretrained(path)
    for key, value in cfg.overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.overrides.{key}: not a key of {type(config).__name__} ({config_file})")
        setattr(config, key, value)
    config.posttrain_fp32_lm_head = cfg.fp32_lm_head
    cls = HybridForCausalLM if model_type == "minimax" else AutoModelForCausalLM
    model = cls.from_pretrained(path, config=config, dtype=_DTYPES[cfg.dtype])
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    return model
