"""Bad input fails with a ValueError naming the argument, or gives a documented finite result."""

import pytest
import torch

from posttrain.algorithms import cispo_loss, grpo_loss, sft_loss

B, T = 3, 4


def batch():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1).requires_grad_()
    old = logp.detach() + 0.1
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 2:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    return logp, old, mask, adv


LOSSES = {
    "grpo_seq": lambda lp, old, m, a: grpo_loss(lp, old, a, m),
    "grpo_tok": lambda lp, old, m, a: grpo_loss(lp, old, a, m, aggregation="token_mean"),
    "grpo_fixed": lambda lp, old, m, a: grpo_loss(lp, old, a, m, aggregation="fixed_len", max_len=T),
    "cispo": lambda lp, old, m, a: cispo_loss(lp, old, a, m, eps_high=0.2),
    "sft": lambda lp, old, m, a: sft_loss(lp, m),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_mask_gives_zero_loss_and_zero_gradient(name):
    logp, old, mask, adv = batch()
    loss, metrics = LOSSES[name](logp, old, torch.zeros_like(mask), adv)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, logp)  # still connected to the graph: every rank can run backward
    assert torch.all(g == 0)
    assert all(torch.isfinite(v) or k.endswith("_max") for k, v in metrics.items())


@pytest.mark.parametrize("name", list(LOSSES))
def test_garbage_in_padding_is_ignored(name):
    logp, old, mask, adv = batch()
    clean_loss, _ = LOSSES[name](logp, old, mask, adv)
    (clean_g,) = torch.autograd.grad(clean_loss, logp)
    # padding may hold -inf / NaN (e.g. logprobs of pad tokens); results must not change
    junk = torch.where(mask.bool(), logp, torch.full_like(logp, float("-inf")))
    old_junk = torch.where(mask.bool(), old, torch.full_like(old, float("nan")))
    loss, _ = LOSSES[name](junk, old_junk, mask, adv)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(g, clean_g)


@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_at_a_trained_token_raises(name):
    logp, old, mask, adv = batch()
    bad = logp.detach().clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logprobs has 1 non-finite value\(s\).*\(0, 1\)"):
        LOSSES[name](bad, old, mask, adv)


def test_shape_errors_name_the_argument():
    logp, old, mask, adv = batch()
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(3, 3\)"):
        grpo_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        cispo_loss(logp, old, adv, mask[:2], eps_high=0.2)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        cispo_loss(logp, old, torch.zeros(B, T + 1), mask, eps_high=0.2)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape"):
        grpo_loss(logp, old, adv, mask, ref_logprobs=old[:1], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"logprobs must be \[B, T\]"):
        sft_loss(logp[0], mask[0])
    with pytest.raises(ValueError, match="is_weight has shape"):
        grpo_loss(logp, old, adv, mask, is_weight=torch.ones(T))


def test_nan_advantages_raise():
    logp, old, mask, adv = batch()
    adv[1] = float("nan")
    with pytest.raises(ValueError, match="advantages has 1 non-finite"):
        grpo_loss(logp, old, adv, mask)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_tokens=0), "num_tokens must be > 0"),
        (dict(aggregation="fixed_len"), "needs max_len"),
        (dict(aggregation="sum"), "aggregation"),
        (dict(kl_coef=0.1), "needs ref_logprobs"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(ratio_level="group"), "ratio_level"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(delta=1.1), "delta"),
    ],
)
def test_grpo_bad_options_raise(kwargs, match):
    logp, old, mask, adv = batch()
    kwargs.setdefault("aggregation", "token_mean")
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, old, adv, mask, **kwargs)


def test_huge_stale_ratio_stays_finite():
    logp, old, mask, adv = batch()
    stale = old - 200.0  # r = e^200 overflows without the log-ratio bound
    for loss, _ in (grpo_loss(logp, stale, adv, mask), cispo_loss(logp, stale, adv, mask, eps_high=0.2)):
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
