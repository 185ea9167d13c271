"""Group advantages and balanced advantages against hand values and a loop re-implementation."""

import math

import pytest
import torch
from trl.trainer.utils import nanstd

from posttrain.algorithms import balanced_advantages, group_advantages


def loop_group_advantages(rewards, g, scale, eps):
    """Float64 loop version of the GRPO formula (unbiased std, eps outside the sqrt)."""
    r = [float(x) for x in rewards]

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for start in range(0, len(r), g):
        grp = r[start : start + g]
        mean = sum(grp) / g
        s = {"group": std(grp), "batch": std(r), "none": None}[scale]
        out += [(x - mean) if s is None else (x - mean) / (s + eps) for x in grp]
    return torch.tensor(out, dtype=torch.float64)


def test_hand_values_binary_group():
    # group [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.75/3) = 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 4, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_loop_reference(scale):
    torch.manual_seed(0)
    rewards = torch.randn(12, dtype=torch.float64)
    got = group_advantages(rewards, 4, scale=scale, eps=1e-4)
    torch.testing.assert_close(got, loop_group_advantages(rewards, 4, scale, 1e-4))


def test_unbiased_std_is_trl_nanstd():
    torch.manual_seed(1)
    rewards = torch.randn(8, dtype=torch.float64)
    trl_adv = (rewards.view(2, 4) - rewards.view(2, 4).mean(1, keepdim=True)) / (
        nanstd(rewards.view(2, 4), dim=1).unsqueeze(1) + 1e-4
    )
    torch.testing.assert_close(group_advantages(rewards, 4), trl_adv.reshape(-1))


def test_invariant_to_constant_per_group():
    torch.manual_seed(2)
    rewards = torch.rand(12, dtype=torch.float64)
    shift = torch.tensor([3.0, -7.0, 100.0], dtype=torch.float64).repeat_interleave(4)
    for scale in ("group", "none"):
        torch.testing.assert_close(
            group_advantages(rewards + shift, 4, scale=scale), group_advantages(rewards, 4, scale=scale)
        )


def test_equal_rewards_and_singleton_groups_give_zero():
    assert torch.equal(group_advantages(torch.ones(6), 3), torch.zeros(6))
    assert torch.equal(group_advantages(torch.tensor([0.3, 5.0]), 1), torch.zeros(2))


def test_integer_rewards_are_cast():
    adv = group_advantages(torch.tensor([1, 0]), 2, eps=0.0)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]))


@pytest.mark.parametrize(
    "rewards,g,match",
    [
        (torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, "rewards has 1 non-finite"),
        (torch.tensor([1.0, 0.0, 1.0]), 2, "multiple of group_size"),
        (torch.ones(2, 2), 2, "rewards must be 1-D"),
        (torch.ones(4), 0, "group_size"),
    ],
)
def test_bad_rewards_raise(rewards, g, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g)


def test_bad_scale_raises():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, scale="std")


def test_balanced_identity_for_centred_unweighted():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]), 4)
    torch.testing.assert_close(balanced_advantages(adv, 4), adv)


def test_balanced_with_lengths_hand_values():
    # group: A = [+1, -1], lengths [2, 6]: P = 2, Q = 6, M = 4 -> scales 2 and 2/3
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = balanced_advantages(adv, 2, lengths=torch.tensor([2, 6]))
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0 / 3.0], dtype=torch.float64))


def test_balanced_properties():
    torch.manual_seed(3)
    adv = torch.randn(16, dtype=torch.float64)
    adv[4:8] = torch.tensor([0.5, 0.2, 0.0, 1.0])  # one-sided group: unchanged
    lengths = torch.randint(1, 50, (16,))
    out = balanced_advantages(adv, 4, lengths=lengths).view(4, 4)
    w = lengths.view(4, 4).double()
    a = adv.view(4, 4)
    for i in (0, 2, 3):
        pos, neg = (w[i] * out[i].clamp(min=0)).sum(), (w[i] * (-out[i]).clamp(min=0)).sum()
        torch.testing.assert_close(pos, neg)
        torch.testing.assert_close(pos + neg, (w[i] * a[i].abs()).sum())
        assert torch.equal(torch.sign(out[i]), torch.sign(a[i]))
    torch.testing.assert_close(out[1], a[1])
