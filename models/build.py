"""Build a preset model or load a checkpoint, as a ModelConfig says."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.models.config import ModelConfig
from posttrain.models.hybrid import HybridForCausalLM
from posttrain.models.logprobs import set_gradient_checkpointing
from posttrain.models.presets import preset_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    kind = _path_model_type(str(path))
    config = AutoConfig.from_pretrained(path)
    for key, value in cfg.overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.overrides.{key}: not a key of {type(config).__name__} ({config_file})")
        setattr(config, key, value)
    config.posttrain_fp32_lm_head = cfg.fp32_lm_head
    cls = HybridForCausalLM if kind == "minimax" else AutoModelForCausalLM
    model = cls.from_pretrained(path, config=config, dtype=_DTYPES[cfg.dtype])
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    return model


def model_type(cfg: ModelConfig) -> str:
    """The Hugging Face model_type `cfg` builds ("minimax" for our presets), from config.json
    alone: no model is built."""
    return "minimax" if cfg.preset is not None else _path_model_type(cfg.path)


def _path_model_type(path: str) -> str:
    return str(json.loads((Path(path) / "config.json").read_text()).get("model_type"))


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The architecture `cfg` describes (its overrides applied) on the meta device: module names
    and shapes without weights or memory (recipe checks that need the model's layer names)."""
    key = json.dumps([cfg.preset, cfg.path, cfg.overrides], sort_keys=True, default=str)
    return _meta_model(key)


@functools.lru_cache(maxsize=8)
def _meta_model(key: str) -> nn.Module:
    preset, path, overrides = json.loads(key)
    if preset is not None:
        config = preset_config(preset, overrides)
        kind = "minimax"
    else:
        config = AutoConfig.from_pretrained(path)
        for k, v in overrides.items():
            setattr(config, k, v)
        kind = _path_model_type(path)
    with torch.device("meta"):
        return HybridForCausalLM(config) if kind == "minimax" else AutoModelForCausalLM.from_config(config)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block (generation, reference log-probs), then its previous
    mode again, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
