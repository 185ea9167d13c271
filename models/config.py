"""ModelConfig: which model a run starts from and how it is held (the recipe's `model:`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class ModelConfig:
    """Which model a run starts from: a preset architecture built from scratch, or a checkpoint.

    Invalid values raise ValueError("<field>: ...") at construction; the recipe loader reports
    them under the key path (model.<field>).
    """

    preset: Optional[str] = None  # a tiny architecture built from scratch (posttrain.models.PRESETS)
    path: Optional[str] = None  # or a Hugging Face causal-LM directory on disk (exactly one of the two)
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys replaced on load (e.g. num_hidden_layers)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights (and DeepSpeed precision)
    fp32_lm_head: bool = True  # LM head in fp32 on learner and rollout side (MiniMax-M1)
    gradient_checkpointing: bool = False  # recompute layer activations in backward (memory for time)

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.path is None):
            raise ValueError("preset: set exactly one of model.preset or model.path")
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"path: directory not found: {self.path}")
        if self.preset is not None:
            from posttrain.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"preset: unknown preset {self.preset!r} (known: {', '.join(sorted(PRESETS))})")

    def with_overrides(self, extra: dict[str, Any]) -> "ModelConfig":
        """This config with `extra` config keys applied on top of `overrides` (a stage's own)."""
        if not extra:
            return self
        from dataclasses import replace

        return replace(self, overrides={**self.overrides, **extra})

    def at_checkpoint(self, path: Optional[str]) -> "ModelConfig":
        """The same settings, loading the checkpoint at `path` (None: unchanged)."""
        if path is None:
            return self
        from dataclasses import replace

        return replace(self, path=path, preset=None)
