"""Models: our MiniMax-Text-01 hybrid (lightning + softmax attention, MoE) and any HF causal LM.

Building / loading:
    build_model(cfg, *, vocab_size=None, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        preset (tiny architectures from scratch, see PRESETS) or path (delegates to load_model).
        The tokenizer decides the vocabulary: pass vocab_size and special ids (they override
        the preset's defaults; for a path they are checked against the checkpoint).
    meta_model(cfg): the same architecture on the meta device (module names, no weights).
    model_type(cfg): its Hugging Face model_type ("minimax" for presets), from config.json alone.
    load_model(path, cfg): config.json model_type "minimax" -> HybridForCausalLM, anything else
        -> transformers.AutoModelForCausalLM (never remote code).
    Saving: `model.save_pretrained(dir)` (config.json + model.safetensors); the files load in
    plain transformers as MiniMaxForCausalLM.

Configured by ModelConfig (models/config.py, the recipe's `model:`). Our one config extension:
`config.posttrain_fp32_lm_head` (bool), set from ModelConfig.fp32_lm_head
by build_model/load_model on every model, ours or HF; it travels in config.json.

Training entry points: forward_hidden, token_logprobs, set_gradient_checkpointing (logprobs.py).
Decoding for the native engine: posttrain.models.decode. Packed rows: posttrain.models.varlen.
"""
from __future__ import annotations

from posttrain.models.build import build_model, eval_mode, load_model, meta_model, model_type
from posttrain.models.config import ModelConfig
from posttrain.models.hybrid import HybridForCausalLM, lm_head_fp32, router_aux_loss
from posttrain.models.logprobs import forward_hidden, set_gradient_checkpointing, token_logprobs
from posttrain.models.presets import PRESETS, Preset, preset_config

__all__ = [
    "ModelConfig",
    "PRESETS",
    "Preset",
    "build_model",
    "load_model",
    "meta_model",
    "model_type",
    "eval_mode",
    "preset_config",
    "HybridForCausalLM",
    "forward_hidden",
    "token_logprobs",
    "set_gradient_checkpointing",
    "lm_head_fp32",
    "router_aux_loss",
]
