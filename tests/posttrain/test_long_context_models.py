"""Model-side long-context fixes: packed rows reach the softmax layers as per-document causal
SDPA calls (no dense [T, T] block mask, whose math-path memory is quadratic in the row)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.config import ModelConfig
from posttrain.models import build_model
from posttrain.models.varlen import cu_seqlens_from_lengths

torch.set_num_threads(1)


def test_packed_softmax_layers_attend_per_document_without_a_mask(monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-softmax", overrides={"num_hidden_layers": 2})).eval()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    lengths = [30, 70, 1]
    ids = torch.randint(3, 100, (1, sum(lengths)))
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu_seqlens_from_lengths(lengths)).logits[0]
        alone = model(ids[:, 30:100]).logits[0]
    assert calls[:3] == [(30, True, True), (70, True, True), (1, True, True)]  # layer 0
    assert len(calls) == 2 * 3 + 2  # 2 layers x 3 documents, then 2 layers for the document alone
    assert torch.allclose(packed[30:100], alone, atol=1e-5)
