"""Dynamic sampling, DAPO overlong penalty, truncation masking."""

import pytest
import torch

from posttrain.algorithms import dynamic_sampling_mask, overlong_penalty, truncation_mask


def test_dynamic_sampling_keeps_groups_with_spread():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.25])
    assert dynamic_sampling_mask(rewards, 3).tolist() == [False, True, False, True]
    assert dynamic_sampling_mask(torch.tensor([0.0, 1e-9]), 2, atol=1e-6).tolist() == [False]
    with pytest.raises(ValueError, match="rewards has 1 non-finite"):
        dynamic_sampling_mask(torch.tensor([0.0, float("nan")]), 2)


def test_overlong_penalty_hand_values():
    # L_max = 100, L_cache = 20: 0 up to 80, linear to -1 at 100, -1 beyond
    lengths = torch.tensor([0, 80, 81, 90, 100, 101, 500])
    out = overlong_penalty(lengths, max_len=100, cache_len=20, penalty=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, penalty=0.5), 0.5 * out)


def test_overlong_penalty_bad_args():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), 10, 20)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([-1]), 10, 5)


def test_truncation_mask_from_reasons_and_bools():
    mask = torch.ones(3, 4)
    mask[1, 2:] = 0
    out = truncation_mask(["stop", "length", None], mask)
    assert out.dtype == mask.dtype
    assert out.sum(1).tolist() == [4.0, 0.0, 4.0]
    out_b = truncation_mask(torch.tensor([True, False, False]), mask.bool())
    assert out_b.dtype == torch.bool and out_b.sum(1).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="truncated has 2"):
        truncation_mask(["stop", "length"], mask)
