"""The RL objectives optimise the reward: a fresh tiny model, sampled by the native engine, updated
with grpo_objective / cispo_objective exactly as the rl stage builds its batches, raises the
mean reward of its own samples on a fixed prompt set within a few steps; the same loop with the
reward negated lowers it (so the test can fail on a sign or alignment error).

Reward: the completion starts with a digit (~10% of a random model's first tokens).
"""
from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import group_advantages
from posttrain.config import ModelConfig
from posttrain.data import build_tokenizer, encode_prompt
from posttrain.models import build_model
from posttrain.objectives import CISPOLoss, GRPOLoss, PolicyObjective, StepCounts
from posttrain.data import token_ids
from posttrain.rollout import SamplingConfig, SamplingParams
from posttrain.rollout.native import NativeEngine
from posttrain.stages.rl import Sample, to_rl_batch

G, STEPS = 8, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def starts_with_digit(text: str) -> float:
    return float(text[:1].isdigit())


def train(kind: str, sign: float) -> list[float]:
    """Mean reward of each step's samples (before that step's update)."""
    tok = build_tokenizer("char")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-hybrid"), **token_ids(tok)).train()
    prompts = [encode_prompt(f"{a}+{b}=", tok) for a, b in
               [(1, 2), (13, 4), (7, 70), (25, 31), (9, 9), (40, 2), (3, 58), (66, 6)]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    means = []
    for step in range(STEPS):
        model.eval()
        outs = NativeEngine(model, num_slots=64).generate(prompts, SamplingParams(
            n=G, temperature=1.0, max_new_tokens=3, stop_token_ids=(tok.eos_token_id,), seed=step))
        model.train()
        rewards = torch.tensor([starts_with_digit(tok.decode(c.token_ids, skip_special_tokens=True)) for c in outs])
        means.append(float(rewards.mean()))
        adv = group_advantages(sign * rewards, G)
        samples = [Sample(prompts[c.prompt_index], c, float(r), float(r), float(a))
                   for c, r, a in zip(outs, rewards.tolist(), adv.tolist())]
        batch = to_rl_batch(samples, tok.pad_token_id, mask_truncated=False)
        n_tok = float(batch.mask.sum())
        updates = 2 if kind == "cispo" else 1  # CISPO: two off-policy updates per batch, as in the demo
        loss_cfg = CISPOLoss(eps_high=4.0) if kind == "cispo" else GRPOLoss(clip_low=0.2, clip_high=0.28,
                                                                               aggregation="token_mean")
        objective = PolicyObjective(loss_cfg, SamplingConfig(temperature=1.0, max_new_tokens=3))
        counts = StepCounts(tokens=n_tok, sequences=float(len(samples)))
        if updates > 1:
            batch.old_logprobs = objective.logprobs(model, [batch])[0]
        for _ in range(updates):
            opt.zero_grad()
            loss, _ = objective(model, batch, counts)
            loss.backward()
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
