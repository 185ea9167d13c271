"""The toys behind posttrain.testing: deterministic tiny policies, the verifiable task and the
loss inputs shaped as the stages feed them."""
from __future__ import annotations

import pytest
import torch

from posttrain.testing import (
    char_tokenizer, digit_task, non_digit_task, policy_logprobs, policy_loss_inputs, preference_loss_inputs,
    rl_batch_from_samples, toy_hybrid, toy_transformer,
)
from posttrain.testing.toys import preference_pairs, response_ids, sequence_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("build", [toy_hybrid, toy_transformer])
def test_toy_policies_are_deterministic_and_score_tokens(build):
    tok = char_tokenizer()
    state = torch.random.get_rng_state()
    a, b = build(0, tok), build(0, tok)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert a.training and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), build(1, tok).parameters()))
    prompts = [tok.encode("1+2=", add_special_tokens=False)] * 2
    rows = sequence_rows(prompts, [response_ids("3", tok), response_ids("45", tok)], tok.pad_token_id)
    logp, aux = policy_logprobs(a, *rows)
    on = rows[1] >= 0
    assert logp.shape == rows[0].shape and on.sum() == 5  # "3<eos>" and "45<eos>"
    assert bool((logp[on] < 0).all()) and bool((logp[~on] == 0).all()) and torch.isfinite(aux)


def test_tasks_and_their_inverse():
    up, down = digit_task(), non_digit_task()
    assert up.prompts == down.prompts and len(up.prompts) == 8
    for text in ["12", "x", "", " 3"]:
        assert up.reward(text) + down.reward(text) == 1.0
        assert up.negated().reward(text) == -up.reward(text)
    assert len(preference_pairs()) == 8


def test_policy_loss_inputs_look_like_a_stage_micro_batch():
    x = policy_loss_inputs(B=12, T=10, seed=0, is_weight=True)
    lengths = x.mask.sum(1)
    assert x.logprobs.dtype == torch.float32 and x.advantages.shape == (12,)
    assert lengths.max() == 10 and lengths.min() == 1 and len(set(lengths.tolist())) > 3
    for t in (x.logprobs, x.old_logprobs, x.ref_logprobs):
        assert bool((t[x.mask == 0] == 0).all()) and bool((t[x.mask > 0] < 0).all())
    assert (x.advantages != 0).any() and torch.allclose(x.advantages.reshape(3, 4).sum(1), torch.zeros(3), atol=1e-5)
    part = x.rows(torch.tensor([11, 3]), trim=True)
    assert part.mask.shape == (2, int(lengths[[11, 3]].max())) and part.num_tokens == float(lengths[[11, 3]].sum())
    on_policy = policy_loss_inputs(spread=0.0)
    assert torch.equal(on_policy.logprobs, on_policy.old_logprobs)


def test_preference_loss_inputs():
    x = preference_loss_inputs(B=8, seed=0)
    assert x.chosen_logps.shape == (8,) and bool((x.chosen_logps < 0).all()) and x.num_pairs == 8.0
    assert bool((x.chosen_lengths >= 2).all()) and x.rows(torch.tensor([1, 2])).num_pairs == 2.0
    same = preference_loss_inputs(spread=0.0)
    assert torch.equal(same.chosen_logps, same.ref_chosen_logps)


def test_rl_batch_from_samples_uses_the_stage_layout():
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.native import NativeEngine

    tok = char_tokenizer()
    task = digit_task()
    prompts = task.encode(tok)[:2]
    outs = NativeEngine(toy_hybrid(0, tok), num_slots=8).generate(
        prompts, SamplingParams(n=4, max_new_tokens=3, stop_token_ids=(tok.eos_token_id,), seed=0))
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    batch = rl_batch_from_samples(prompts, outs, rewards, 4, pad_token_id=tok.pad_token_id)
    assert batch.advantages[0] > 0 and bool((batch.advantages[1:4] < 0).all())
    assert bool((batch.advantages[4:] == 0).all())  # an all-equal group
    assert batch.mask.sum(1).tolist() == [float(len(c.token_ids)) for c in outs]
    row = 0
    start = len(prompts[0]) - 1
    assert batch.targets[row, start:start + len(outs[0].token_ids)].tolist() == outs[0].token_ids
