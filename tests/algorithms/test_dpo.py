"""DPO family against TRL 1.16's DPOTrainer loss code and the papers' formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms import dpo_loss

B, T = 4, 6


def make_pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen_tok = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    rejected_tok = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    cm = torch.ones(B, T, dtype=torch.float64)
    rm = torch.ones(B, T, dtype=torch.float64)
    cm[0, 3:] = 0
    rm[1, 2:] = 0
    rm[3, 5:] = 0
    ref_c = (chosen_tok * cm).sum(1) + torch.randn(B, generator=g, dtype=torch.float64)
    ref_r = (rejected_tok * rm).sum(1) + torch.randn(B, generator=g, dtype=torch.float64)
    return chosen_tok, rejected_tok, cm, rm, ref_c, ref_r


@pytest.mark.parametrize(
    "loss_type,smoothing,beta",
    [("sigmoid", 0.0, 0.1), ("hinge", 0.0, 0.5), ("ipo", 0.0, 0.1), ("robust", 0.2, 0.3), ("robust", 0.0, 0.1)],
)
def test_matches_trl(loss_type, smoothing, beta, trl_dpo):
    ct, rt, cm, rm, ref_c, ref_r = make_pairs()
    ct_a, rt_a = ct.clone().requires_grad_(), rt.clone().requires_grad_()
    ct_b, rt_b = ct.clone().requires_grad_(), rt.clone().requires_grad_()
    ours, m = dpo_loss(
        (ct_a * cm).sum(1), (rt_a * rm).sum(1), ref_c, ref_r, beta=beta, loss_type=loss_type,
        label_smoothing=smoothing, chosen_lengths=cm.sum(1), rejected_lengths=rm.sum(1),
    )
    trl, tm = trl_dpo(ct_b, rt_b, cm, rm, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    torch.testing.assert_close(ours, trl)
    g_ours = torch.autograd.grad(ours, (ct_a, rt_a))
    g_trl = torch.autograd.grad(trl, (ct_b, rt_b))
    for a, b in zip(g_ours, g_trl):
        torch.testing.assert_close(a, b)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(m[key].item(), tm[key], msg=key)
    assert 0 < tm["rewards/accuracies"] < 1  # the toy batch has both outcomes


def test_sigmoid_label_smoothing_is_conservative_dpo():
    # cDPO (Mitchell 2023): -(1-e) logsig(b d) - e logsig(-b d); hand-computed for one pair.
    beta, e = 0.5, 0.1
    d = (-2.0 - -3.0) - (-4.0 - -3.5)  # 1.5
    expected = -(1 - e) * math.log(1 / (1 + math.exp(-beta * d))) - e * math.log(1 / (1 + math.exp(beta * d)))
    loss, _ = dpo_loss(
        torch.tensor([-2.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-3.5]),
        beta=beta, label_smoothing=e,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hand_values_and_gradient_sigmoid():
    chosen = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    loss, m = dpo_loss(chosen, rejected, ref, ref, beta=1.0)
    d = torch.tensor([2.0, -1.0], dtype=torch.float64)  # margins
    torch.testing.assert_close(loss, -F.logsigmoid(d).mean())
    gc, gr = torch.autograd.grad(loss, (chosen, rejected))
    # d/dchosen of -logsig(d)/B = -(1 - sig(d)) / B
    torch.testing.assert_close(gc, -(1 - torch.sigmoid(d)) / 2)
    torch.testing.assert_close(gr, (1 - torch.sigmoid(d)) / 2)
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/margins"].item() == pytest.approx(0.5)


def test_rpo_adds_per_token_nll_of_chosen():
    ct, rt, cm, rm, ref_c, ref_r = make_pairs(1)
    args = ((ct * cm).sum(1), (rt * rm).sum(1), ref_c, ref_r)
    base, _ = dpo_loss(*args)
    mixed, m = dpo_loss(*args, rpo_alpha=0.5, chosen_lengths=cm.sum(1))
    nll = (-(ct * cm).sum(1) / cm.sum(1)).mean()
    torch.testing.assert_close(mixed, base + 0.5 * nll)
    torch.testing.assert_close(m["loss/nll"], nll)


def test_num_pairs_makes_shards_sum_to_the_whole():
    ct, rt, cm, rm, ref_c, ref_r = make_pairs(2)
    c, r = (ct * cm).sum(1), (rt * rm).sum(1)
    whole, _ = dpo_loss(c, r, ref_c, ref_r, loss_type="robust", label_smoothing=0.1)
    parts = sum(
        dpo_loss(c[s], r[s], ref_c[s], ref_r[s], loss_type="robust", label_smoothing=0.1, num_pairs=B)[0]
        for s in (slice(0, 1), slice(1, 4))
    )
    torch.testing.assert_close(parts, whole)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="ipo"), "chosen_lengths is required"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="kto"), "loss_type"),
        (dict(rpo_alpha=1.0), "chosen_lengths is required"),
        (dict(beta=0.0), "beta"),
    ],
)
def test_bad_options_raise(kwargs, match):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_bad_tensors_raise():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="rejected_logps has shape"):
        dpo_loss(x, torch.zeros(2), x, x)
    with pytest.raises(ValueError, match="ref_chosen_logps has 1 non-finite"):
        dpo_loss(x, x, torch.tensor([0.0, float("nan"), 0.0]), x)
    with pytest.raises(ValueError, match="chosen_logps must be a 1-D"):
        dpo_loss(torch.zeros(3, 2), x, x, x)
    with pytest.raises(ValueError, match="empty"):
        e = torch.zeros(0)
        dpo_loss(e, e, e, e)
