"""forward_hidden / token_logprobs / gradient checkpointing against unchunked references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from posttrain.models import HybridForCausalLM, forward_hidden, set_gradient_checkpointing, token_logprobs


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return HybridForCausalLM(tiny_config())


def _batch(V: int, B: int = 2, T: int = 30):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[1, 20:] = -100  # padding
    targets[0, 3] = -7  # any negative value is ignored
    return ids, targets


def _reference(model, hidden, targets):
    logits = model.lm_head(hidden).float()  # [B, T, V]
    logp_all = logits.log_softmax(-1)
    valid = targets >= 0
    lp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return lp, ent


def test_chunked_equals_unchunked_values_and_grads(model, rel_err):
    ids, targets = _batch(model.config.vocab_size)
    w1, w2 = torch.randn(2, *ids.shape, generator=torch.Generator().manual_seed(9))

    def run(fn):
        model.zero_grad()
        hidden, aux = forward_hidden(model, ids)
        lp, ent = fn(hidden)
        ((lp * w1).sum() + (ent * w2).sum() + aux).backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lp, ent, grads = run(lambda h: token_logprobs(model, h, targets, chunk_size=7, with_entropy=True))
    lp_ref, ent_ref, grads_ref = run(lambda h: _reference(model, h, targets))
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-6)
    assert (lp[targets < 0] == 0).all() and (ent[targets < 0] == 0).all()
    for name, g in grads_ref.items():  # fp32 summation order differs: compare to the tensor's scale
        assert rel_err(grads[name], g) <= 1e-5, name
    assert grads_ref["lm_head.weight"].abs().sum() > 0


def test_full_logits_never_saved_for_backward(model):
    ids, targets = _batch(model.config.vocab_size, T=64)
    V = model.config.vocab_size
    hidden, _ = forward_hidden(model, ids)
    hidden = hidden.detach().requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = token_logprobs(model, hidden, targets, chunk_size=16)
    assert not any(len(s) >= 2 and s[-1] == V and s[0] != V for s in saved), saved  # no [.., V] activations
    lp.sum().backward()  # recomputation in backward works
    assert hidden.grad.abs().sum() > 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        _reference(model, hidden, targets)
    assert any(s[-1] == V and len(s) == 3 for s in saved)  # the unchunked form does save them


def test_fp32_lm_head(tiny_config):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(posttrain_fp32_lm_head=True)).to(torch.bfloat16)
    ids, targets = _batch(model.config.vocab_size)
    with torch.no_grad():
        hidden, _ = forward_hidden(model, ids)
        lp = token_logprobs(model, hidden, targets, chunk_size=8)
        logits32 = hidden.float() @ model.lm_head.weight.float().T
        ref = logits32.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets >= 0)
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
        model.config.posttrain_fp32_lm_head = False  # bf16 head: visibly different numbers
        lp16 = token_logprobs(model, hidden, targets, chunk_size=8)
        assert (lp16 - ref).abs().max() > 1e-4


def test_forward_hidden_hf_moe_aux_matches_transformers():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, router_aux_loss_coef=0.05)
    model = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    hidden, aux = forward_hidden(model, ids)
    out = model(ids, output_router_logits=True)
    torch.testing.assert_close(aux, cfg.router_aux_loss_coef * out.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.lm_head(hidden), out.logits, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_same_grads_and_recomputes(model, rel_err):
    ids, targets = _batch(model.config.vocab_size)
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads():
        model.zero_grad()
        hidden, aux = forward_hidden(model, ids)
        (token_logprobs(model, hidden, targets).sum() + aux).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    assert calls == [1] * 6
    set_gradient_checkpointing(model, True, layers=[0, 2])
    calls[:] = [0] * 6
    got = grads()
    assert calls == [2, 1, 2, 1, 1, 1]  # checkpointed layers ran again in backward
    for n, g in ref.items():
        assert rel_err(got[n], g) <= 1e-6, n
    set_gradient_checkpointing(model, False)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
