"""Shared-prefix log-probs (posttrain.models.shared_prefix through target_logprobs) against the
plain full forward of the same batch: values, entropies, router aux loss and every gradient."""
from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.collate import Batch
from posttrain.models import HybridForCausalLM
from posttrain.models.shared_prefix import plan_shared_prefixes
from posttrain.objectives import target_logprobs


def rl_rows(V: int, prompts: list[list[int]], completions: list[tuple[int, list[int]]]) -> Batch:
    """Right-padded rows prompt + completion, targets on the completion only (as stages.rl builds them)."""
    rows = [(prompts[p], c) for p, c in completions]
    T = max(len(p) + len(c) for p, c in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        mask[b, : len(p) + len(c)] = 1
        targets[b, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(c)
    return Batch(ids, targets, torch.arange(T).expand(B, T).contiguous(), mask)


def random_batch(V: int, seed: int, n_prompts: int = 3, rows: int = 10) -> Batch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(5, 90))] for _ in range(n_prompts)]
    comps = [(rng.randrange(n_prompts), [rng.randrange(V) for _ in range(rng.randrange(1, 6))]) for _ in range(rows)]
    return rl_rows(V, prompts, comps)


def run(model, batch: Batch, share: bool, temperature: float = 1.0):
    model.zero_grad()
    lp, ent, aux = target_logprobs(model, batch, chunk_size=16, temperature=temperature, with_entropy=True,
                                   share_prefixes=share)
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(2, *lp.shape, generator=g)
    ((lp * w1).sum() + (ent * w2).sum() + 10 * aux).backward()
    return lp.detach(), ent.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("seed, temperature", [(0, 1.0), (1, 0.7), (2, 1.3)])
def test_shared_prefix_equals_full_forward(tiny_config, rel_err, seed, temperature):
    torch.manual_seed(seed)
    model = HybridForCausalLM(tiny_config()).train()
    batch = random_batch(model.config.vocab_size, seed)
    assert plan_shared_prefixes(batch.input_ids, batch.targets, batch.attention_mask) is not None
    lp, ent, aux, grads = run(model, batch, share=True, temperature=temperature)
    lp_ref, ent_ref, aux_ref, grads_ref = run(model, batch, share=False, temperature=temperature)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    assert (lp[batch.targets < 0] == 0).all() and (ent[batch.targets < 0] == 0).all()
    for name, g in grads_ref.items():  # fp32 summation order differs: compare to the tensor's scale
        assert rel_err(grads[name], g) <= 1e-4, name


def test_rows_ending_at_their_prefix_and_rows_without_targets(tiny_config, rel_err):
    """One-token completions (the whole window is the prefix's last position) and a row with no
    target at all (its tokens still count in the aux loss)."""
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config()).train()
    V = model.config.vocab_size
    batch = rl_rows(V, [[3, 4, 5, 6, 7], [8, 9, 10]], [(0, [11]), (0, [12]), (1, [13]), (1, [14])])
    batch.targets[3] = -100
    lp, ent, aux, grads = run(model, batch, share=True)
    lp_ref, ent_ref, aux_ref, grads_ref = run(model, batch, share=False)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    for name, g in grads_ref.items():  # an expert no token chose has a zero gradient in both
        assert (grads[name] - g).abs().max() <= 1e-4 * max(g.abs().max().item(), 1e-6), name


def test_no_shared_prefix_or_not_right_padded_uses_the_full_forward():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    targets = torch.tensor([[-100, 3, -100, -100], [-100, -100, 7, -100]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert plan_shared_prefixes(ids, targets, mask) is None  # distinct prompts
    ids[1] = torch.tensor([1, 2, 9, 9])
    targets[1] = torch.tensor([-100, 9, 9, -100])
    plan = plan_shared_prefixes(ids, targets, mask)
    assert plan is not None and plan.group == [0, 0] and plan.prefix_len == [2, 2] and plan.width == 3
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert plan_shared_prefixes(ids, targets, left) is None
    targets[0, 3] = 5  # a target on padding
    assert plan_shared_prefixes(ids, targets, mask) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only test)")
def test_on_the_gpu_the_full_forward_runs(tiny_config, monkeypatch):
    """On a GPU the shared-prefix path is slower (launch-bound; benchmarks/rl_learner_gpu.py),
    so target_logprobs takes the full forward there even when asked to share prefixes."""
    import posttrain.objectives.common as common

    model = HybridForCausalLM(tiny_config()).cuda().eval()
    batch = random_batch(tiny_config().vocab_size, seed=0)
    batch = Batch(*(t.cuda() for t in (batch.input_ids, batch.targets, batch.position_ids, batch.attention_mask)))
    monkeypatch.setattr(common, "shared_prefix_hidden", lambda *a: pytest.fail("shared prefix ran on the GPU"))
    with torch.no_grad():
        lp, _, _ = target_logprobs(model, batch, chunk_size=16, share_prefixes=True)
    assert lp.is_cuda and bool((lp[batch.targets >= 0] < 0).all())
