"""The rl stage's objectives optimise the reward: posttrain.testing's toy hybrid, sampled by the
native engine, updated with the stage's own PolicyObjective (grpo, cispo) on micro-batches built
by the stage's own to_rl_batch (posttrain.testing.rl_batch_from_samples), raises the mean reward
of its own samples on the toy task within a few steps; the same loop with the reward negated
lowers it (so the test can fail on a sign or alignment error).

posttrain.testing.check_policy_optimises proves the same of the pure losses; this test proves
it of the objective the learners actually run (temperature, aux loss, old log-probs for K = 2).
"""
from __future__ import annotations

import pytest
import torch

from posttrain.objectives import CISPOLoss, GRPOLoss, PolicyObjective, StepCounts
from posttrain.rollout import SamplingConfig, SamplingParams
from posttrain.rollout.native import NativeEngine
from posttrain.testing import char_tokenizer, digit_task, rl_batch_from_samples, toy_hybrid

G, STEPS = 8, 12

pytestmark = pytest.mark.usefixtures("one_thread")


def train(kind: str, sign: float) -> list[float]:
    """Mean reward of each step's samples (before that step's update)."""
    tok, task = char_tokenizer(), digit_task()
    model = toy_hybrid(0, tok)
    prompts = task.encode(tok)
    loss = CISPOLoss(eps_high=4.0) if kind == "cispo" else GRPOLoss(clip_low=0.2, clip_high=0.28)
    objective = PolicyObjective(loss, SamplingConfig(n=G, temperature=1.0, max_new_tokens=3))
    updates = 2 if kind == "cispo" else 1  # CISPO: two off-policy updates per batch, as in the demo
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    means = []
    for step in range(STEPS):
        outs = NativeEngine(model, num_slots=64).generate(prompts, SamplingParams.of(
            objective.sampling, stop_token_ids=(tok.eos_token_id,), seed=step))
        model.train()
        rewards = [task.reward(tok.decode(c.token_ids, skip_special_tokens=True)) for c in outs]
        means.append(sum(rewards) / len(rewards))
        batch = rl_batch_from_samples(prompts, outs, [sign * r for r in rewards], G, pad_token_id=tok.pad_token_id)
        counts = StepCounts(tokens=float(batch.mask.sum()), sequences=float(len(outs)))
        if updates > 1:
            batch.old_logprobs = objective.logprobs(model, [batch])[0]
        for _ in range(updates):
            opt.zero_grad()
            objective(model, batch, counts)[0].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return means


@pytest.mark.parametrize("kind", ["grpo", "cispo"])
def test_rl_objective_raises_the_reward_of_its_samples(kind):
    up = train(kind, +1.0)
    assert up[0] < 0.3  # a fresh model rarely starts with a digit
    assert sum(up[-3:]) / 3 > max(0.5, 2 * sum(up[:3]) / 3), up


def test_negated_reward_lowers_it():
    down = train("grpo", -1.0)
    assert sum(down[-3:]) / 3 < 0.5 * sum(down[:3]) / 3 + 1e-9, down
