"""GPU path of lightning attention (fla Triton kernels) against independent references.

Runs only with CUDA and flash-linear-attention (`fla-core`) importable; skipped otherwise.
References: the float64 step-by-step recurrence (on the GPU, upcast inputs), the CPU chunked
torch implementation, per-document runs for packed rows, and prefill-vs-decode states.
Tolerances (relative Frobenius error ||out - ref|| / ||ref||): bf16 inputs ~1e-2, fp32 ~1e-3
(Triton's fp32 dots run as tf32).
"""
from __future__ import annotations

import pytest
import torch

from posttrain.models.lightning import (
    fla_available,
    lightning_attention,
    lightning_attention_recurrent,
    lightning_attention_torch,
    lightning_slopes,
    lightning_step,
    lightning_step_,
)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla-core (GPU-only test)"
)

TOL = {torch.bfloat16: 2e-2, torch.float32: 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(B, T, H, D, dtype, seed):
    """q, k, v as the model makes them: silu of a projection (non-negative-ish, O(1))."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = [torch.nn.functional.silu(torch.randn(B, T, H, D, device="cuda", generator=g)) * D**-0.5 for _ in range(3)]
    return [t.to(dtype) for t in x]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 63, 64, 300])
def test_fla_matches_float64_recurrence(dtype, T):
    H, D = 4, 64
    q, k, v = _inputs(2, T, H, D, dtype, seed=T)
    slopes = lightning_slopes(H, layer_idx=0, num_layers=8, device="cuda")
    s0 = torch.randn(2, H, D, D, device="cuda") * 0.1
    o, final = lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True)
    o_ref, final_ref = lightning_attention_recurrent(
        q.double(), k.double(), v.double(), slopes.double(), initial_state=s0.double()
    )
    assert o.dtype == dtype and final.dtype == torch.float32 and torch.isfinite(o).all()
    assert _rel(o, o_ref) < TOL[dtype]
    assert _rel(final, final_ref) < TOL[dtype]


def test_fla_matches_cpu_chunked_and_gradients():
    H, D, T = 3, 32, 200
    q, k, v = (x.requires_grad_() for x in _inputs(1, T, H, D, torch.float32, seed=1))
    slopes = lightning_slopes(H, 2, 8, device="cuda")
    w = torch.randn(1, T, H, D, device="cuda")
    o, _ = lightning_attention(q, k, v, slopes)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    qc, kc, vc = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    o_cpu, _ = lightning_attention_torch(qc, kc, vc, slopes.cpu().double(), chunk_size=16)
    grads_cpu = torch.autograd.grad((o_cpu * w.cpu().double()).sum(), (qc, kc, vc))
    assert _rel(o.cpu(), o_cpu) < TOL[torch.float32]
    for g, r in zip(grads, grads_cpu):
        assert _rel(g.cpu(), r) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fla_varlen_equals_per_document(dtype):
    lengths = [5, 130, 1, 64, 77]  # documents straddle fla's 64-token chunks
    H, D = 4, 64
    q, k, v = _inputs(1, sum(lengths), H, D, dtype, seed=7)
    slopes = lightning_slopes(H, 3, 8, device="cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    s0 = torch.randn(len(lengths), H, D, D, device="cuda") * 0.1
    o, finals = lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    for n in range(len(lengths)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        o_n, f_n = lightning_attention(
            q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], slopes, initial_state=s0[n : n + 1], output_final_state=True
        )
        assert _rel(o[:, lo:hi], o_n) < TOL[dtype] / 4  # same kernel: only chunk alignment differs
        assert _rel(finals[n : n + 1], f_n) < TOL[dtype] / 4
    o_leak, _ = lightning_attention(q, k, v, slopes)  # the per-document check has teeth
    assert _rel(o_leak[:, 5:135], o[:, 5:135]) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_steps_continue_prefill_state(dtype):
    """Prefill T0 tokens with the chunk kernel, then decode with the fused recurrent kernel
    (in place on a cache tensor): outputs and states equal one chunked pass over all tokens."""
    # D = 128 as in the model for bf16; fp32 at D = 64, because fp32 at D = 128 makes fla autotune
    # its chunk kernels for minutes on a cold machine (one more shape; the step kernel is the same)
    H, D, T0, steps = 4, 128 if dtype == torch.bfloat16 else 64, 100, 9
    q, k, v = _inputs(3, T0 + steps, H, D, dtype, seed=3)
    slopes = lightning_slopes(H, 1, 8, device="cuda")
    o_all, final_all = lightning_attention(q, k, v, slopes, output_final_state=True)
    _, state = lightning_attention(q[:, :T0], k[:, :T0], v[:, :T0], slopes, output_final_state=True)
    cache = torch.zeros(5, H, D, D, device="cuda")  # more slots than sequences: rows 1..3 used
    cache[1:4] = state
    ref_state = state.clone()
    for t in range(T0, T0 + steps):
        view = cache[1:4]  # contiguous rows of the cache, updated in place
        o_t = lightning_step_(q[:, t], k[:, t], v[:, t], slopes, view)
        o_ref, ref_state = lightning_step(q[:, t], k[:, t], v[:, t], slopes, ref_state)
        assert _rel(o_t, o_all[:, t]) < TOL[dtype]
        assert _rel(o_t, o_ref) < TOL[dtype] / 4
    assert _rel(cache[1:4], final_all) < TOL[dtype]
    assert (cache[0] == 0).all() and (cache[4] == 0).all()  # other slots untouched


def test_model_prefill_and_decode_on_gpu_match_full_forward(tiny_config):
    """The hybrid model on CUDA (fla chunk kernel in prefill, fused recurrent in decode,
    batched left-padded prefill): every decoded position's logits equal the full forward's."""
    from posttrain.models import HybridForCausalLM
    from posttrain.models.decode import DecodeCache, decode_step, prefill_many

    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(head_dim=64)).cuda().eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (40, 37, 33)]  # left padding in prefill
    prompt = 30
    with torch.no_grad():
        full = [model(s[None].cuda()).logits[0] for s in seqs]
        logits, states = prefill_many(model, [s[:prompt] for s in seqs])
    cache = DecodeCache(model, num_slots=3, max_len=48)
    for slot, st in enumerate(states):
        cache.insert(slot, st)
    errs = [_rel(logits[i], full[i][prompt - 1]) for i in range(3)]
    for t in range(prompt, 33):  # all slots active: the in-place path
        tokens = torch.stack([s[t] for s in seqs]).cuda()
        out = decode_step(model, tokens, cache, torch.ones(3, dtype=torch.bool, device="cuda"))
        errs += [_rel(out[i], full[i][t]) for i in range(3)]
    for t in range(33, 37):  # slot 2 finished: the gathered path
        tokens = torch.stack([seqs[0][t], seqs[1][t], torch.tensor(0)]).cuda()
        out = decode_step(model, tokens, cache, torch.tensor([True, True, False], device="cuda"))
        errs += [_rel(out[i], full[i][t]) for i in range(2)]
    assert max(errs) < 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fla_varlen_gradients_equal_per_document(dtype):
    """Backward of the packed kernel: many documents shorter than fla's 64-token chunk (the
    shape of arithmetic rows packed beside retrieval documents in long-context SFT)."""
    lengths = [15, 15, 90, 15, 3, 70, 15, 1]
    H, D = 4, 64
    q, k, v = (x.requires_grad_() for x in _inputs(1, sum(lengths), H, D, dtype, seed=11))
    slopes = lightning_slopes(H, 1, 8, device="cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    w = torch.randn(1, sum(lengths), H, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    o, _ = lightning_attention(q, k, v, slopes, cu_seqlens=cu)
    packed = torch.autograd.grad((o.float() * w).sum(), (q, k, v))
    alone = [torch.zeros_like(x) for x in (q, k, v)]
    for n in range(len(lengths)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        parts = [x[:, lo:hi].detach().requires_grad_() for x in (q, k, v)]
        o_n, _ = lightning_attention(*parts, slopes)
        for acc, g in zip(alone, torch.autograd.grad((o_n.float() * w[:, lo:hi]).sum(), parts)):
            acc[:, lo:hi] = g
    for g_packed, g_alone in zip(packed, alone):
        assert _rel(g_packed, g_alone) < TOL[dtype] / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_model_loss_and_gradients_equal_documents_alone(tiny_config, dtype):
    """The whole packed-row training path on CUDA (fla varlen lightning layers, per-document
    SDPA, grouped or looped experts): logits and every parameter gradient of a packed row equal
    the sum over its documents run alone. A state or attention leak across documents, or a wrong
    varlen backward, would train long-context SFT on something else than what inference sees."""
    from posttrain.models import HybridForCausalLM
    from posttrain.models.varlen import cu_seqlens_from_lengths

    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(head_dim=64)).cuda().to(dtype)
    V = model.config.vocab_size
    lengths = [15, 15, 90, 15, 3, 70, 15]
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, V, (1, n), generator=g).cuda() for n in lengths]
    w = torch.randn(1, sum(lengths), V, generator=g).cuda()
    cu = cu_seqlens_from_lengths(lengths).cuda()

    def grads_of(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_logits = model(torch.cat(docs, dim=1), cu_seqlens=cu).logits.float()
    packed = grads_of((packed_logits * w).sum())
    alone_logits, alone = [], {}
    for n, doc in enumerate(docs):
        lo, hi = int(cu[n]), int(cu[n + 1])
        logits = model(doc).logits.float()
        alone_logits.append(logits.detach())
        for name, gr in grads_of((logits * w[:, lo:hi]).sum()).items():
            alone[name] = alone.get(name, 0) + gr
    tol = TOL[dtype]
    assert _rel(packed_logits.detach(), torch.cat(alone_logits, dim=1)) < tol
    assert packed.keys() == alone.keys()
    worst = max(packed, key=lambda name: _rel(packed[name], alone[name]))
    assert _rel(packed[worst], alone[worst]) < 2 * tol, worst


def test_a_known_gpu_runs_the_state_kernels_on_their_pinned_config_without_autotuning():
    from fla.ops.common import chunk_h

    from posttrain.models.fla_tuning import _autotuner, pinned_configs

    configs = pinned_configs(torch.cuda.get_device_name(0))
    if not configs:
        pytest.skip(f"no pinned configs for {torch.cuda.get_device_name(0)}")
    H, D, T = 2, 128, 256
    q, k, v = (x.requires_grad_() for x in _inputs(1, T, H, D, torch.bfloat16, seed=3))
    slopes = lightning_slopes(H, 1, 8, device="cuda")
    o, _ = lightning_attention(q, k, v, slopes)
    o.float().square().sum().backward()
    for name, cfg in configs.items():
        tuner = _autotuner(getattr(chunk_h, name))
        assert len(tuner.configs) == 1 and tuner.cache == {}  # one config: nothing benchmarked
        c = tuner.configs[0]
        assert (c.kwargs, c.num_warps, c.num_stages) == (cfg["kwargs"], cfg["num_warps"], cfg["num_stages"])
    o_ref, _ = lightning_attention_recurrent(q.detach().double(), k.detach().double(), v.detach().double(),
                                             slopes.double())
    assert _rel(o.detach(), o_ref) < TOL[torch.bfloat16]
