"""Typed recipe configuration (one small dataclass per component)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class ModelConfig:
    """Which model a run starts from.

    Exactly one of `preset` (a tiny architecture built from scratch, see posttrain.models)
    or `path` (a Hugging Face causal-LM directory on disk) is set. `overrides` replaces keys
    of the preset's transformers config (e.g. `num_hidden_layers: 16`).
    """

    preset: Optional[str] = None
    path: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fp32_lm_head: bool = True
    gradient_checkpointing: bool = False
