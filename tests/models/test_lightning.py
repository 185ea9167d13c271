"""Lightning attention: chunked torch form vs the float64 recurrence and vs transformers' layer."""
from __future__ import annotations

import pytest
import torch
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

from posttrain.models.hybrid import LayerContext, LightningAttention
from posttrain.models.lightning import (
    lightning_attention,
    lightning_attention_recurrent,
    lightning_attention_torch,
    lightning_slopes,
)


def _qkv(B=2, T=37, H=3, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=dtype) * 0.5 for _ in range(3)]


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_equals_recurrence(chunk):
    q, k, v = _qkv()
    slopes = lightning_slopes(3, layer_idx=1, num_layers=4).double()
    s0 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    o, final = lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True, chunk_size=chunk)
    o_ref, final_ref = lightning_attention_recurrent(q, k, v, slopes, initial_state=s0)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_fp32_close_to_float64_reference():
    q, k, v = _qkv(T=100)
    slopes = lightning_slopes(3, 0, 8)
    o, final = lightning_attention(q.float(), k.float(), v.float(), slopes, output_final_state=True)
    o_ref, final_ref = lightning_attention_recurrent(q, k, v, slopes.double())
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_equal_recurrence():
    q, k, v = (x.requires_grad_() for x in _qkv(B=1, T=21, H=2, D=4))
    s0 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.3, 0.05], dtype=torch.float64)
    w = torch.randn(1, 21, 2, 4, dtype=torch.float64)
    o, f = lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True, chunk_size=8)
    grads = torch.autograd.grad((o * w).sum() + f.sum(), (q, k, v, s0))
    o2, f2 = lightning_attention_recurrent(q, k, v, slopes, initial_state=s0)
    grads_ref = torch.autograd.grad((o2 * w).sum() + f2.sum(), (q, k, v, s0))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_varlen_resets_state_per_document():
    lengths = [5, 20, 1, 11]  # documents straddle the chunk boundaries of chunk_size=8
    q, k, v = _qkv(B=1, T=sum(lengths))
    slopes = lightning_slopes(3, 2, 4).double()
    cu = torch.tensor([0, 5, 25, 26, 37], dtype=torch.int32)
    s0 = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    o, finals = lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True, chunk_size=8)
    for n in range(4):
        lo, hi = int(cu[n]), int(cu[n + 1])
        o_ref, f_ref = lightning_attention_recurrent(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], slopes, initial_state=s0[n : n + 1])
        torch.testing.assert_close(o[:, lo:hi], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(finals[n : n + 1], f_ref, rtol=1e-10, atol=1e-10)
    # without cu_seqlens the documents would see each other: the check above has teeth
    o_leak, _ = lightning_attention(q, k, v, slopes, chunk_size=8)
    assert (o_leak[:, 5:25] - o[:, 5:25]).abs().max() > 1e-3


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(B=2, T=10)
    with pytest.raises(ValueError, match="B == 1"):
        lightning_attention(q, k, v, torch.ones(3), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="slopes"):
        lightning_attention(q, k, v, torch.ones(4))


def test_slopes_match_transformers(tiny_config):
    cfg = tiny_config()
    for layer in (0, 3):
        ref = MiniMaxLightningAttention(cfg, layer).slope_rate.flatten()
        torch.testing.assert_close(lightning_slopes(cfg.num_attention_heads, layer, cfg.num_hidden_layers), ref)


@pytest.mark.parametrize("layer_idx", [0, 4])
def test_layer_matches_transformers(tiny_config, layer_idx):
    cfg = tiny_config()  # transformers block_size 16; 45 tokens = 2 full blocks + a partial one
    torch.manual_seed(0)
    ref = MiniMaxLightningAttention(cfg, layer_idx)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = LightningAttention(cfg, layer_idx)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"slope_rate", "query_decay", "key_decay", "diagonal_decay"}
    x = torch.randn(2, 45, cfg.hidden_size)
    out_ref, state_ref = ref(x, position_embeddings=None, attention_mask=None)
    ctx = LayerContext(cos=None, sin=None, softmax_mask=None, token_mask=None, cu_seqlens=None, return_state=True, chunk_size=8)
    out, state = ours(x, ctx)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_matches_torch_path():
    """On CUDA `lightning_attention` dispatches to fla when installed; it must equal the torch form."""
    lengths = [100, 3, 157]
    q, k, v = (x.float().cuda() for x in _qkv(B=1, T=sum(lengths), H=4, D=64))
    slopes = lightning_slopes(4, 1, 8, device="cuda")
    cu = torch.tensor([0, 100, 103, 260], dtype=torch.int32, device="cuda")
    s0 = torch.randn(3, 4, 64, 64, device="cuda")
    o, f = lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    o_ref, f_ref = lightning_attention_torch(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(f, f_ref, rtol=2e-3, atol=2e-3)


def test_varlen_uneven_lengths_take_the_per_document_path():
    """One long document among short ones (padding would be mostly zeros): same results."""
    lengths = [1, 1, 1, 100]
    q, k, v = _qkv(B=1, T=sum(lengths))
    slopes = lightning_slopes(3, 1, 4).double()
    cu = torch.tensor([0, 1, 2, 3, 103], dtype=torch.int32)
    o, finals = lightning_attention(q, k, v, slopes, cu_seqlens=cu, output_final_state=True, chunk_size=8)
    for n in range(4):
        lo, hi = int(cu[n]), int(cu[n + 1])
        o_ref, f_ref = lightning_attention_recurrent(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], slopes)
        torch.testing.assert_close(o[:, lo:hi], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(finals[n : n + 1], f_ref, rtol=1e-10, atol=1e-10)


def test_in_place_step_equals_functional_step():
    from posttrain.models.lightning import lightning_step, lightning_step_

    q, k, v = (x[:, 0] for x in _qkv(B=3, T=1))
    slopes = lightning_slopes(3, 0, 4).double()
    state = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    o_ref, s_ref = lightning_step(q, k, v, slopes, state.clone())
    o = lightning_step_(q, k, v, slopes, state)  # updates `state`
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s_ref, rtol=1e-12, atol=1e-12)
