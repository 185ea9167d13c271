"""Preset architectures built from scratch (tiny ones for CPU, small ones for GPU benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from transformers import MiniMaxConfig

from posttrain.models.hybrid import FULL, LINEAR


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
