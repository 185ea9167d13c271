"""Packed rows: each document's logits inside a packed row equal its logits computed alone."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.models import HybridForCausalLM, forward_hidden
from posttrain.models.varlen import (
    block_causal_mask,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    positions_from_cu_seqlens,
)

LENGTHS = [50, 30, 70, 1]  # with chunk 64 the middle documents straddle chunk boundaries


def _docs(vocab: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in LENGTHS]


def test_varlen_helpers():
    cu = cu_seqlens_from_lengths([2, 3, 1])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 6]
    pos = positions_from_cu_seqlens(cu)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert cu_seqlens_from_position_ids(pos).tolist() == cu.tolist()
    m = block_causal_mask(cu)[0, 0]
    assert m[3].tolist() == [False, False, True, True, False, False]


def test_packed_documents_equal_alone(tiny_config, rel_err):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config()).eval()
    docs = _docs(model.config.vocab_size)
    cu = cu_seqlens_from_lengths(LENGTHS)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), cu_seqlens=cu).logits[0]
        leaky = model(torch.cat(docs, dim=1)).logits[0]
        for n, doc in enumerate(docs):
            alone = model(doc).logits[0]
            lo, hi = int(cu[n]), int(cu[n + 1])
            assert rel_err(packed[lo:hi], alone) <= 1e-5, f"document {n}"
        # the unpacked forward differs: documents after the first would leak otherwise
        assert rel_err(leaky[50:80], packed[50:80]) > 1e-2


def test_left_padding_with_attention_mask(tiny_config, rel_err):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config()).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=pos).logits[:, 6:]
        ref = model(x).logits
    assert rel_err(out, ref) <= 1e-5


def test_forward_hidden_packed_hf_model(rel_err):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    docs = _docs(cfg.vocab_size)
    cu = cu_seqlens_from_lengths(LENGTHS)
    with torch.no_grad():
        packed, aux = forward_hidden(model, torch.cat(docs, dim=1), cu_seqlens=cu)
        assert aux.item() == 0.0
        for n, doc in enumerate(docs):
            alone, _ = forward_hidden(model, doc)
            assert rel_err(packed[0, int(cu[n]) : int(cu[n + 1])], alone[0]) <= 1e-5
