"""Memory-lean training paths of the hybrid model give the same logits and gradients.

- RMSNorm's custom backward (saves x and rstd only) against plain autograd over the same
  expression: forward bit-identical, gradients equal to rounding.
- SparseMoE over token slices (checkpointed per slice while autograd records, nested inside
  the layer checkpoint) against one pass over all tokens: logits and every gradient equal.
"""
from __future__ import annotations

import pytest
import torch

from posttrain.models import HybridForCausalLM, set_gradient_checkpointing
from posttrain.models.hybrid import RMSNorm, SparseMoE

torch.set_num_threads(1)


def _autograd_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


# statistics are fp32 for every input dtype (x.float()), so float64 inputs agree to fp32 rounding
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_lean_backward_matches_autograd(dtype, tol):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g) * 0.5 + 1)
    x = (torch.randn(3, 7, 48, generator=g) * 3).to(dtype).requires_grad_()
    up = torch.randn(3, 7, 48, generator=g).to(dtype)
    y = norm(x)
    gx, gw = torch.autograd.grad((y * up).sum(), (x, norm.weight))
    w_ref = norm.weight.detach().clone().requires_grad_()
    y_ref = _autograd_rmsnorm(x, w_ref, norm.eps)
    gx_ref, gw_ref = torch.autograd.grad((y_ref * up).sum(), (x, w_ref))
    assert torch.equal(y, y_ref)  # same forward expression: bit-identical
    for a, b in ((gx, gx_ref), (gw, gw_ref)):
        assert a.dtype == b.dtype
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


def _loss_and_grads(model: HybridForCausalLM, ids: torch.Tensor):
    out = model(ids, output_router_logits=True, labels=ids)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()])
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_moe_token_slices_keep_logits_and_grads(tiny_config, monkeypatch, checkpointing):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config()).double().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 29))  # 58 tokens per MoE call
    logits_ref, loss_ref, grads_ref = _loss_and_grads(model, ids)
    set_gradient_checkpointing(model, checkpointing)
    monkeypatch.setattr(SparseMoE, "token_chunk", 9)  # 7 slices, the last one short
    calls = []
    monkeypatch.setattr(SparseMoE, "mix", lambda self, *a: calls.append(a[0].shape[0]) or _MIX(self, *a))
    logits, loss, grads = _loss_and_grads(model, ids)
    assert calls[:7] == [9, 9, 9, 9, 9, 9, 4]  # the sliced path ran
    assert torch.allclose(logits, logits_ref, rtol=0, atol=1e-12)
    assert abs(loss.item() - loss_ref.item()) < 1e-12
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads, grads_ref))
    assert worst < 1e-10
    assert all(torch.isfinite(a).all() for a in grads)


_MIX = SparseMoE.mix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", ["learned", "two_experts"])
def test_moe_grouped_gemm_equals_per_expert_loop(tiny_config, moe_run, dtype, route):
    """The grouped-GEMM path (one `_grouped_mm` per projection, no host sync) gives the per-expert
    loop's output and gradients on the CPU (to matmul rounding: the kernels block the sums
    differently), also when experts get no token at all."""
    torch.manual_seed(0)
    moe = SparseMoE(tiny_config()).to(dtype)
    if route == "two_experts":  # every token picks experts 0 and 1; the others stay empty
        with torch.no_grad():
            moe.gate.weight.zero_()
            moe.gate.weight[:2] = 1.0
    x = torch.randn(3, 37, tiny_config().hidden_size, dtype=dtype)
    if route == "two_experts":
        x = x.abs()
    y_g, dx_g, g_g = moe_run(moe, x, True)
    y_l, dx_l, g_l = moe_run(moe, x, False)
    torch.testing.assert_close(y_g, y_l)
    torch.testing.assert_close(dx_g, dx_l)
    for a, b in zip(g_g, g_l):
        torch.testing.assert_close(a, b)
    assert y_g.abs().sum() > 0 and all(g.abs().sum() > 0 for g in g_g[:4])


def test_moe_grouped_gemm_off_for_lora_wrapped_experts(tiny_config):
    """A LoRA layer wrapping an expert projection is not a plain Linear: its adapter would be
    skipped by stacking `.weight`, so the loop runs."""
    moe = SparseMoE(tiny_config())
    moe.grouped_gemm = True
    x = torch.randn(5, tiny_config().hidden_size)
    assert moe.grouped(x)
    moe.experts[1].w2 = torch.nn.Sequential(moe.experts[1].w2)
    assert not moe.grouped(x)
