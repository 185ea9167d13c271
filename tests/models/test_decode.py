"""Prefill + per-slot decoding reproduces the full forward's logits at every position."""
from __future__ import annotations

import pytest
import torch

from posttrain.models import HybridForCausalLM
from posttrain.models.decode import DecodeCache, decode_step, decode_step_static, prefill, prefill_many


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return HybridForCausalLM(tiny_config()).eval()


@pytest.mark.parametrize("step_fn, moe", [(decode_step, "loop"), (decode_step_static, "dense"),
                                           (decode_step_static, "grouped")])
def test_decode_matches_full_forward(model, rel_err, step_fn, moe):
    """decode_step_static (fixed shapes, no host sync: what a CUDA graph replays) too, with the
    MoE on every expert densely or through the grouped GEMMs."""
    if moe == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    for layer in model.model.layers:
        layer.block_sparse_moe.grouped_gemm = moe == "grouped"
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    # (total length, prompt length, step at which the sequence enters its slot)
    plan = {0: (24, 10, 0), 2: (15, 3, 4), 3: (30, 17, 1)}  # slot 1 stays empty throughout
    seqs = {s: torch.randint(0, V, (1, n), generator=g) for s, (n, _, _) in plan.items()}
    with torch.no_grad():
        full = {s: model(x).logits[0] for s, x in seqs.items()}
    cache = DecodeCache(model, num_slots=4, max_len=32)
    cursor = {}  # slot -> index of the next token to feed
    errs = []
    for step in range(40):
        for s, (_, p, start) in plan.items():
            if step == start:
                logits, state = prefill(model, seqs[s][:, :p])
                errs.append(rel_err(logits, full[s][p - 1]))
                cache.insert(s, state)
                cursor[s] = p
        active = torch.zeros(4, dtype=torch.bool)
        tokens = torch.zeros(4, dtype=torch.long)
        for s, t in cursor.items():
            if t < plan[s][0]:
                active[s], tokens[s] = True, seqs[s][0, t]
        if not active.any():
            break
        out = step_fn(model, tokens, cache, active)
        assert out.dtype == torch.float32 and out.shape == (4, V)
        if step_fn is decode_step:  # the static step computes inactive rows too (meaningless)
            assert (out[~active] == 0).all()
        for s in torch.nonzero(active).flatten().tolist():
            errs.append(rel_err(out[s], full[s][cursor[s]]))
            cursor[s] += 1
    assert cache.lengths.tolist() == [24, 0, 15, 30]
    assert len(errs) == 24 + 15 + 30 - (10 + 3 + 17) + 3
    assert max(errs) <= 1e-5


def test_prefill_many_equals_single_prefills(model):
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 70, 1)]
    logits, states = prefill_many(model, prompts)
    for p, lg, st in zip(prompts, logits, states):
        lg1, st1 = prefill(model, p[None])
        torch.testing.assert_close(lg, lg1, rtol=1e-5, atol=1e-5)
        assert st.length == st1.length == p.numel()
        for i in st1.linear:
            torch.testing.assert_close(st.linear[i], st1.linear[i], rtol=1e-5, atol=1e-6)
        for i in st1.kv:
            torch.testing.assert_close(st.kv[i][0], st1.kv[i][0], rtol=1e-5, atol=1e-6)


def test_state_sizes_and_overflow(model):
    cache = DecodeCache(model, num_slots=2, max_len=8)
    c = model.config
    lin = [i for i, t in enumerate(c.layer_types) if t == "linear_attention"]
    assert sorted(cache.linear) == lin and sorted(cache.k) == [2, 5]
    assert cache.linear[0].shape == (2, c.num_attention_heads, 8, 8) and cache.linear[0].dtype == torch.float32
    assert cache.k[2].shape == (2, c.num_key_value_heads, 8, 8)
    _, state = prefill(model, torch.arange(1, 8)[None])
    cache.insert(0, state)
    active = torch.tensor([True, False])
    decode_step(model, torch.tensor([3, 0]), cache, active)  # fills position 7 (the last)
    with pytest.raises(ValueError, match="max_len"):
        decode_step(model, torch.tensor([3, 0]), cache, active)


@pytest.mark.parametrize("max_tokens", [65536, 30])
def test_prefill_many_left_padded_batch_equals_single_prefills(model, max_tokens):
    """Similar lengths take the left-padded batch path (max_tokens=30 also splits the prompts
    into several forwards): logits, lightning states and KV equal one prefill per prompt."""
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 23, 17, 23)]
    logits, states = prefill_many(model, prompts, max_tokens=max_tokens)
    assert_equal_to_single_prefills(model, prompts, logits, states)


def test_prefill_many_mixed_lengths_go_in_padded_groups_in_input_order(model, monkeypatch):
    """Uneven prompts are grouped by length (each group one left-padded batch, never the packed
    row) and come back in the caller's order, equal to one prefill per prompt."""
    import posttrain.models.decode as decode

    V = model.config.vocab_size
    lengths = [40, 3, 41, 9, 40, 3, 12, 39, 10]
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(k)) for k, n in enumerate(lengths)]
    monkeypatch.setattr(decode, "_prefill_packed", lambda *a: pytest.fail("a group ran packed"))
    logits, states = prefill_many(model, prompts)
    monkeypatch.undo()
    assert_equal_to_single_prefills(model, prompts, logits, states)


def assert_equal_to_single_prefills(model, prompts, logits, states) -> None:
    """Each prompt's logits, lightning states and KV equal those of a prefill of it alone."""
    for p, lg, st in zip(prompts, logits, states):
        lg1, st1 = prefill(model, p[None])
        torch.testing.assert_close(lg, lg1, rtol=1e-5, atol=1e-5)
        assert st.length == p.numel()
        for i in st1.linear:
            torch.testing.assert_close(st.linear[i], st1.linear[i], rtol=1e-5, atol=1e-6)
        for i in st1.kv:
            assert st.kv[i][0].shape == st1.kv[i][0].shape
            torch.testing.assert_close(st.kv[i][0], st1.kv[i][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st.kv[i][1], st1.kv[i][1], rtol=1e-5, atol=1e-6)
