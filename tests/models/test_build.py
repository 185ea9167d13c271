"""build_model / load_model: presets, tokenizer-sized vocab, overrides, HF fallback."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import PRESETS, HybridForCausalLM, build_model, load_model, preset_config

L, F = "linear_attention", "full_attention"


def test_tiny_presets():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny-hybrid"), vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    n = sum(p.numel() for p in m.parameters())
    assert 2.5e6 < n < 5e6
    c = m.config
    assert c.layer_types == [L] * 7 + [F] and c.vocab_size == 300 and c.eos_token_id == 2
    assert c.num_local_experts == 4 and c.num_experts_per_tok == 2
    assert c.posttrain_fp32_lm_head is True and not m.training
    assert c.linear_attn_alpha_factor == pytest.approx(16 ** 0.25)  # DeepNorm (2 L)^(1/4)
    assert m.model.embed_tokens.weight[0].abs().sum() > 0  # no zero pad row (see test_pad_token.py)
    soft = preset_config("tiny-softmax")
    assert soft.layer_types == [F] * 8


def test_small_preset_size_on_meta_device():
    with torch.device("meta"):
        m = HybridForCausalLM(preset_config("small-hybrid"))
    n = sum(p.numel() for p in m.parameters())
    assert 1e8 < n < 3e8
    assert m.config.layer_types == ([L] * 7 + [F]) * 2


def test_overrides_and_options():
    cfg = ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 16, "hidden_size": 64},
                      dtype="bfloat16", fp32_lm_head=False, gradient_checkpointing=True)
    m = build_model(cfg, vocab_size=100)
    assert m.config.layer_types == ([L] * 7 + [F]) * 2 and m.config.hidden_size == 64
    assert m.dtype == torch.bfloat16 and m.config.posttrain_fp32_lm_head is False
    assert all(layer.gradient_checkpointing for layer in m.model.layers)
    with pytest.raises(ValueError, match="overrides.hiden_size: not a MiniMaxConfig key"):
        build_model(ModelConfig(preset="tiny-hybrid", overrides={"hiden_size": 64}))
    with pytest.raises(ValueError, match="unknown preset"):
        build_model(ModelConfig(preset="huge"))
    with pytest.raises(ValueError, match="exactly one"):
        build_model(ModelConfig())
    assert set(PRESETS) >= {"tiny-hybrid", "tiny-softmax", "small-hybrid"}


def test_load_model_dispatches_on_model_type(tmp_path):
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=70, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    qwen.save_pretrained(tmp_path / "qwen")
    build_model(ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2}), vocab_size=70).save_pretrained(
        tmp_path / "ours"
    )
    got = load_model(tmp_path / "qwen", ModelConfig(path=str(tmp_path / "qwen"), fp32_lm_head=True, overrides={"rms_norm_eps": 1e-4}))
    assert isinstance(got, Qwen2ForCausalLM) and got.config.posttrain_fp32_lm_head and got.config.rms_norm_eps == 1e-4
    torch.testing.assert_close(got.lm_head.weight, qwen.lm_head.weight, rtol=0, atol=0)
    ours = build_model(ModelConfig(path=str(tmp_path / "ours")), vocab_size=70)
    assert isinstance(ours, HybridForCausalLM) and ours.config.layer_types == [L, L]
    with pytest.raises(ValueError, match="tokenizer has 71 tokens"):
        build_model(ModelConfig(path=str(tmp_path / "ours")), vocab_size=71)
    with pytest.raises(ValueError, match="overrides.nope: not a key of Qwen2Config"):
        load_model(tmp_path / "qwen", ModelConfig(path=str(tmp_path / "qwen"), overrides={"nope": 1}))
    with pytest.raises(ValueError, match="has no config.json"):  # checked when the config is built
        load_model(tmp_path, ModelConfig(path=str(tmp_path)))
