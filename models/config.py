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
        if self.path is not None:
            _model_dir_ok(self.path)
        if self.preset is not None:
            from posttrain.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"preset: unknown preset {self.preset!r} (known: {', '.join(sorted(PRESETS))})")
        try:
            self.check_overrides(self.overrides)
        except ValueError as e:
            raise ValueError(f"overrides.{e}") from None

    def check_overrides(self, overrides: dict[str, Any]) -> None:
        """Each key names a key of the model's config class (what the loaders will set);
        ValueError("<key>: ...") otherwise."""
        if self.preset is not None:
            from transformers import MiniMaxConfig

            known, what = set(MiniMaxConfig().to_dict()), "a MiniMaxConfig key"
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.path)
            known, what = set(config.to_dict()) | set(vars(config)), f"a key of {type(config).__name__}"
        for key in overrides:
            if key not in known:
                raise ValueError(f"{key}: not {what}")

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


# What a Hugging Face model directory must hold to load: config.json and weights. Pickled
# checkpoints (pytorch_model.bin) are not loaded (DESIGN principle 8).
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _model_dir_ok(path: str) -> None:
    import json

    d = Path(path)
    try:
        if not d.is_dir():
            raise ValueError(f"path: directory not found: {path}")
        config = d / "config.json"
        if not config.is_file():
            raise ValueError(f"path: {path} has no config.json (not a Hugging Face model directory)")
        try:
            meta = json.loads(config.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"path: {config} is not a JSON file ({type(e).__name__})") from None
        if not isinstance(meta, dict) or "model_type" not in meta:
            raise ValueError(f"path: {config} has no model_type (not a transformers config)")
        if not any((d / w).is_file() for w in _WEIGHTS):
            raise ValueError(f"path: {path} has no {' or '.join(_WEIGHTS)} (weights)")
    except OSError as e:  # a name too long for the file system, no permission, ...
        raise ValueError(f"path: {e.strerror}: {path}") from None
