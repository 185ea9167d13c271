"""Tiny MiniMax configs for the model tests (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch
from transformers import MiniMaxConfig

L, F = "linear_attention", "full_attention"


def tiny_config(**kw) -> MiniMaxConfig:
    """6 layers in blocks of (2 lightning + 1 softmax), GQA, 4 experts top-2, non-trivial
    DeepNorm factors, so a swapped factor or layer type shows in the logits."""
    base = dict(
        vocab_size=101, hidden_size=32, intermediate_size=24, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        layer_types=[L, L, F, L, L, F], block_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        full_attn_alpha_factor=1.3, full_attn_beta_factor=0.8,
        linear_attn_alpha_factor=1.2, linear_attn_beta_factor=0.9,
        mlp_alpha_factor=1.1, mlp_beta_factor=0.7, initializer_range=0.1,
    )
    base.update(kw)
    return MiniMaxConfig(**base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def cfg() -> MiniMaxConfig:
    return tiny_config()


@pytest.fixture(name="tiny_config")
def tiny_config_factory():
    return tiny_config


@pytest.fixture(name="rel_err")
def rel_err_fn():
    return rel_err


def moe_run(moe, x: torch.Tensor, grouped: bool):
    """A SparseMoE's output, input gradient and every parameter gradient (zeros where an expert
    got no token) with the grouped-GEMM path on or off, under a fixed non-uniform loss."""
    moe.grouped_gemm = grouped
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y, _ = moe(x)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in moe.parameters()]
    return y.detach(), x.grad, grads


@pytest.fixture(name="moe_run")
def moe_run_fn():
    return moe_run


@pytest.fixture
def model_pair(tmp_path):
    """(ours, transformers') with identical weights (through transformers' files), eval mode."""
    from transformers import MiniMaxForCausalLM

    from posttrain.models import HybridForCausalLM

    torch.manual_seed(0)
    theirs = MiniMaxForCausalLM(tiny_config()).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = HybridForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return ours, theirs
