"""TIS / MIS weights and mismatch metrics against loop references of the published rules."""

import math

import numpy as np
import pytest
import torch

from posttrain.algorithms import grpo_loss, mismatch_metrics, rollout_correction

B, T = 4, 5


def make(seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    rollout = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    return old, rollout, mask


def loop_weight(old, rollout, mask, mode, level, high, low):
    lo = 0.0 if low is None else low
    w = torch.zeros_like(old)
    for i in range(old.shape[0]):
        seq_rho = math.exp(sum(float(old[i, t] - rollout[i, t]) for t in range(old.shape[1]) if mask[i, t]))
        for t in range(old.shape[1]):
            if not mask[i, t]:
                continue
            rho = seq_rho if level == "sequence" else math.exp(float(old[i, t] - rollout[i, t]))
            if mode == "tis":
                w[i, t] = min(max(rho, lo), high) if low is not None else min(rho, high)
            else:
                w[i, t] = rho if lo <= rho <= high else 0.0
    return w


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("low", [None, 0.5])
def test_weights_match_loop(mode, level, low):
    old, rollout, mask = make()
    w, m = rollout_correction(old, rollout, mask, mode=mode, level=level, high=1.5, low=low)
    torch.testing.assert_close(w, loop_weight(old, rollout, mask, mode, level, 1.5, low))
    assert not w.requires_grad
    frac = m["is_clip_frac" if mode == "tis" else "is_drop_frac"]
    assert 0 < frac < 1  # the toy batch exercises both sides of the bound


def test_token_metrics():
    old, rollout, mask = make(1)
    _, m = rollout_correction(old, rollout, mask, high=1.2)
    rho = (old - rollout).exp()[mask.bool()]
    torch.testing.assert_close(m["is_ratio_mean"], rho.mean())
    torch.testing.assert_close(m["is_ratio_max"], rho.max())
    torch.testing.assert_close(m["is_ratio_min"], rho.min())
    torch.testing.assert_close(m["is_clip_frac"], (rho > 1.2).double().mean())


def test_long_sequence_product_does_not_overflow():
    old = torch.zeros(1, 4000)
    rollout = torch.full((1, 4000), -0.1)  # rho = e^400 in float32 would be inf
    w, m = rollout_correction(old, rollout, torch.ones(1, 4000), mode="tis", level="sequence", high=2.0)
    assert torch.all(w == 2.0) and torch.isfinite(m["is_ratio_max"])
    w, _ = rollout_correction(old, rollout, torch.ones(1, 4000), mode="mis", level="sequence", high=2.0)
    assert torch.all(w == 0.0)


def test_weight_feeds_grpo_as_a_multiplier():
    old, rollout, mask = make(2)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    w, _ = rollout_correction(old, rollout, mask, mode="mis", high=1.3)
    logp = old.clone().requires_grad_()
    loss, _ = grpo_loss(logp, old, adv, mask, is_weight=w, aggregation="token_mean")
    (g,) = torch.autograd.grad(loss, logp)
    # at r == 1 the policy gradient is -A * w / N per token: dropped tokens get none
    torch.testing.assert_close(g, -adv.unsqueeze(1) * w * mask / mask.sum())
    assert (g[(w == 0) & mask.bool()] == 0).all() and (w[mask.bool()] == 0).any()


def test_mismatch_metrics_against_numpy():
    old, rollout, mask = make(3, spread=0.1)
    m = mismatch_metrics(old, rollout, mask)
    keep = mask.bool().numpy()
    a, b = old.numpy()[keep], rollout.numpy()[keep]
    assert m["logp_abs_diff_mean"].item() == pytest.approx(np.abs(a - b).mean())
    assert m["logp_abs_diff_max"].item() == pytest.approx(np.abs(a - b).max())
    assert m["prob_pearson"].item() == pytest.approx(np.corrcoef(np.exp(a), np.exp(b))[0, 1])
    assert m["is_ratio_min"].item() == pytest.approx(np.exp(a - b).min())
    assert m["is_ratio_max"].item() == pytest.approx(np.exp(a - b).max())
    assert m["is_ratio_mean"].item() == pytest.approx(np.exp(a - b).mean())
    assert m["kl_k3"].item() == pytest.approx(np.mean(np.exp(a - b) - (a - b) - 1))


def test_mismatch_metrics_identical_and_empty():
    old, _, mask = make(4)
    m = mismatch_metrics(old, old, mask)
    assert m["logp_abs_diff_max"] == 0 and m["is_ratio_mean"] == 1
    assert m["prob_pearson"].item() == pytest.approx(1.0)
    empty = mismatch_metrics(old, old, torch.zeros_like(mask))
    assert all(torch.isnan(v) for v in empty.values())


def test_bad_inputs():
    old, rollout, mask = make()
    with pytest.raises(ValueError, match="rollout_logprobs has shape"):
        rollout_correction(old, rollout[:, :3], mask)
    with pytest.raises(ValueError, match="mode"):
        rollout_correction(old, rollout, mask, mode="clip")
    with pytest.raises(ValueError, match="low"):
        rollout_correction(old, rollout, mask, low=3.0, high=2.0)
    bad = rollout.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rollout_logprobs has 1 non-finite"):
        rollout_correction(old, bad, mask)
    bad_pad = rollout.clone()
    bad_pad[3, 4] = float("nan")  # padding: ignored
    w, _ = rollout_correction(old, bad_pad, mask)
    assert torch.isfinite(w).all()


def test_mismatch_pearson_never_exceeds_one():
    """Near-identical sides: the correlation's rounding must not leave [-1, 1] (the demo test
    asserts prob_pearson <= 1; a run logged 1.0000001)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        lp = -torch.rand(1, 97, generator=g) * 3
        other = lp + torch.randn(1, 97, generator=g) * 1e-7
        m = mismatch_metrics(lp, other, torch.ones_like(lp))
        assert -1.0 <= m["prob_pearson"].item() <= 1.0
