"""Checkpoints interchange with transformers' MiniMaxForCausalLM (same config, same weight names)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MiniMaxForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import HybridForCausalLM, load_model


def _ids(vocab: int, shape=(2, 45), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_ours_saved_loads_in_transformers(cfg, tmp_path, rel_err):
    torch.manual_seed(0)
    ours = HybridForCausalLM(cfg).eval()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "minimax"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(theirs, MiniMaxForCausalLM)
    x = _ids(cfg.vocab_size)  # 45 tokens: 3 transformers blocks of 16, the last partial
    with torch.no_grad():
        assert rel_err(ours(x).logits, theirs(x).logits) <= 1e-5


def test_transformers_saved_loads_in_ours(cfg, tmp_path, rel_err):
    torch.manual_seed(0)
    theirs = MiniMaxForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path, ModelConfig(path=str(tmp_path), fp32_lm_head=False))
    assert isinstance(ours, HybridForCausalLM)
    # every stored weight (bar transformers' precomputed decay tables) maps onto one of ours
    stored = {k for k in load_file(tmp_path / "model.safetensors") if not k.endswith(("_decay", "slope_rate"))}
    assert stored == set(ours.state_dict())
    x = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(x).logits, theirs(x).logits) <= 1e-5


def test_router_aux_loss_matches_transformers(model_pair):
    ours, theirs = model_pair
    x = _ids(ours.config.vocab_size, (2, 20))
    mask = torch.ones_like(x)
    mask[1, 15:] = 0  # right padding: excluded from the balance statistics
    ref = theirs(x, attention_mask=mask, output_router_logits=True).aux_loss
    got = ours(x, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    ref_nomask = theirs(x, output_router_logits=True).aux_loss
    assert abs(ref_nomask.item() - ref.item()) > 1e-6  # the mask matters, so the check above has teeth
    torch.testing.assert_close(ours(x, output_router_logits=True).aux_loss, ref_nomask, rtol=1e-6, atol=0)


def test_tied_embeddings_and_fp32_flag_roundtrip(tmp_path, tiny_config):
    cfg = tiny_config(tie_word_embeddings=True, posttrain_fp32_lm_head=True)
    torch.manual_seed(0)
    ours = HybridForCausalLM(cfg)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ours.save_pretrained(tmp_path)
    again = HybridForCausalLM.from_pretrained(tmp_path)
    assert again.config.posttrain_fp32_lm_head is True
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(again.lm_head.weight, ours.lm_head.weight, rtol=0, atol=0)
