"""GRPO and CISPO: TRL 1.16's own loss code, a float64 loop reference, hand gradients, invariances."""

import math

import pytest
import torch

from posttrain.algorithms import cispo_loss, grpo_loss

B, T = 5, 7


def make_batch(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    mask[4, 6:] = 0
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9], dtype=torch.float64)
    return logp, old, ref, mask, adv


def leaf(x):
    return x.detach().clone().requires_grad_()


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def loop_ppo(logp, old, adv, mask, clip_low, clip_high, aggregation, *, max_len=None, delta=None,
             drop=None, ref=None, kl_coef=0.0, kl="k3", num_tokens=None):
    """Loop re-implementation of the published per-token formulas (autograd through scalars)."""
    per_seq, total, count = [], 0.0, 0.0
    for i in range(logp.shape[0]):
        seq_sum, n = 0.0, 0.0
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            unclipped = r if delta is None else torch.clamp(r, max=delta)
            clipped = torch.clamp(r, 1 - clip_low, 1 + clip_high)
            term = -torch.minimum(unclipped * a, clipped * a)
            if drop is not None and a < 0 and r.item() > drop:
                term = term * 0.0
            if ref is not None and kl_coef:
                x = ref[i, t] - logp[i, t]
                k = {
                    "k1": -x,
                    "k2": 0.5 * x**2,
                    "k3": torch.exp(x) - x - 1,
                    "prob": (math.exp(logp[i, t].item()) - math.exp(float(ref[i, t]))) * logp[i, t],
                }[kl]
                term = term + kl_coef * k
            seq_sum, n = seq_sum + term, n + 1
        per_seq.append(seq_sum / max(n, 1.0))
        total, count = total + seq_sum, count + n
    if aggregation == "seq_mean":
        return sum(per_seq) / len(per_seq)
    if aggregation == "token_mean":
        return total / (count if num_tokens is None else num_tokens)
    return total / (logp.shape[0] * max_len)


# --- TRL 1.16 equality -------------------------------------------------------------------

TRL_AGG = {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "fixed_len", "dapo": "token_mean"}


@pytest.mark.parametrize("trl_type", list(TRL_AGG))
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28)])
def test_grpo_aggregations_match_trl(trl_type, clips, trl_grpo):
    logp, old, _, mask, adv = make_batch()
    a, b = leaf(logp), leaf(logp)
    num_items = 40.0  # the step's global token count (dapo); more than this batch holds
    ours, m = grpo_loss(
        a, old, adv, mask, clip_low=clips[0], clip_high=clips[1], aggregation=TRL_AGG[trl_type],
        max_len=T, num_tokens=num_items if trl_type == "dapo" else None,
    )
    trl, tm = trl_grpo(
        b, old, adv, mask, loss_type=trl_type, epsilon_low=clips[0], epsilon_high=clips[1],
        max_completion_length=T, num_items_in_batch=num_items,
    )
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(grad_of(ours, a), grad_of(trl, b))
    assert tm["clip_ratio/low_mean"] > 0 and tm["clip_ratio/high_mean"] > 0  # the clip is exercised
    torch.testing.assert_close(m["clip_frac_low"].item(), tm["clip_ratio/low_mean"])
    torch.testing.assert_close(m["clip_frac_high"].item(), tm["clip_ratio/high_mean"])
    torch.testing.assert_close(m["clip_frac"].item(), tm["clip_ratio/region_mean"])


@pytest.mark.parametrize(
    "ours_kw,trl_kw",
    [
        (dict(delta=1.5), dict(delta=1.5)),  # INTELLECT-2 two-sided clip
        (dict(ratio_level="sequence"), dict(importance_sampling_level="sequence")),  # GSPO
        (dict(kl_coef=0.05, kl_estimator="k3"), dict(beta=0.05)),  # DeepSeekMath KL
    ],
    ids=["delta", "gspo", "kl_k3"],
)
def test_grpo_options_match_trl(ours_kw, trl_kw, trl_grpo):
    logp, old, ref, mask, adv = make_batch(seed=1, spread=0.6)
    a, b = leaf(logp), leaf(logp)
    ours, m = grpo_loss(a, old, adv, mask, ref_logprobs=ref, **ours_kw)
    trl, tm = trl_grpo(b, old, adv, mask, loss_type="grpo", ref_logprobs=ref, **trl_kw)
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(grad_of(ours, a), grad_of(trl, b))
    if "kl" in tm:
        torch.testing.assert_close(m["kl"].item(), tm["kl"])


def test_delta_changes_the_loss():
    logp, old, _, mask, adv = make_batch(seed=1, spread=0.6)
    plain, _ = grpo_loss(logp, old, adv, mask)
    capped, m = grpo_loss(logp, old, adv, mask, delta=1.5)
    assert m["delta_frac"] > 0 and capped < plain  # capping r on A < 0 tokens lowers -r*A


def test_cispo_matches_trl_with_is_weight(trl_grpo):
    logp, old, _, mask, adv = make_batch(seed=2, spread=0.5)
    is_w = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5
    a, b = leaf(logp), leaf(logp)
    ours, m = cispo_loss(a, old, adv, mask, eps_high=0.3, num_tokens=30.0, is_weight=is_w)
    # TRL's epsilon_high for CISPO is the cap itself: 1 + eps_high.
    trl, tm = trl_grpo(b, old, adv, mask, loss_type="cispo", epsilon_high=1.3, num_items_in_batch=30.0,
                            is_ratio=is_w)
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(grad_of(ours, a), grad_of(trl, b))
    assert m["clip_frac_high"] > 0


def test_grpo_is_weight_matches_trl_vllm_correction(trl_grpo):
    logp, old, _, mask, adv = make_batch(seed=3)
    is_w = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    a, b = leaf(logp), leaf(logp)
    ours, _ = grpo_loss(a, old, adv, mask, is_weight=is_w, aggregation="token_mean")
    trl, _ = trl_grpo(b, old, adv, mask, loss_type="bnpo", is_ratio=is_w)
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(grad_of(ours, a), grad_of(trl, b))


# --- loop reference for what TRL does not implement ----------------------------------------


@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "prob"])
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "fixed_len"])
def test_grpo_matches_loop_reference(kl, aggregation):
    logp, old, ref, mask, adv = make_batch(seed=5, spread=0.5)
    a, b = leaf(logp), leaf(logp)
    kw = dict(clip_low=0.2, clip_high=0.28, delta=3.0, drop=1.3, ref=ref, kl_coef=0.1, kl=kl)
    ours, m = grpo_loss(a, old, adv, mask, clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_len=9,
                        ref_logprobs=ref, kl_coef=0.1, kl_estimator=kl, delta=3.0, neg_adv_drop_ratio=1.3)
    expected = loop_ppo(b, old, adv, mask, aggregation=aggregation, max_len=9, **kw)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad_of(ours, a), grad_of(expected, b))
    assert m["drop_frac"] > 0


def test_minimax_drop_zeroes_exactly_those_tokens():
    logp, old, _, mask, adv = make_batch(seed=5, spread=0.5)
    a = leaf(logp)
    loss, _ = grpo_loss(a, old, adv, mask, neg_adv_drop_ratio=1.3)
    g = grad_of(loss, a)
    dropped = (adv.unsqueeze(1) < 0) & ((logp - old).exp() > 1.3) & (mask > 0)
    assert dropped.any()
    assert torch.all(g[dropped] == 0)
    # without the drop those tokens (A < 0, r > 1 + clip) carry a gradient: PPO does not clip them
    a2 = leaf(logp)
    g2 = grad_of(grpo_loss(a2, old, adv, mask)[0], a2)
    assert torch.all(g2[dropped] != 0)


def test_prob_kl_gradient_is_probability_difference():
    logp, _, ref, mask, adv = make_batch(seed=6)
    a = leaf(logp)
    loss, _ = grpo_loss(a, logp, torch.zeros(B, dtype=torch.float64), mask, ref_logprobs=ref, kl_coef=1.0,
                        kl_estimator="prob", aggregation="token_mean")
    expected = (logp.exp() - ref.exp()) * mask / mask.sum()  # d/dlogp of sg(pi - pi_ref) * log pi
    torch.testing.assert_close(grad_of(loss, a), expected)


# --- hand-derived gradients --------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "fixed_len"])
def test_grpo_at_ratio_one_has_reinforce_gradient(aggregation):
    logp, _, _, mask, adv = make_batch()
    a = leaf(logp)
    loss, m = grpo_loss(a, logp, adv, mask, aggregation=aggregation, max_len=10)
    lengths = mask.sum(1, keepdim=True)
    denom = {"seq_mean": lengths * B, "token_mean": mask.sum(), "fixed_len": B * 10.0}[aggregation]
    torch.testing.assert_close(grad_of(loss, a), -adv.unsqueeze(1) * mask / denom)
    assert m["clip_frac"] == 0 and m["ratio_mean"] == 1


def test_cispo_keeps_gradient_where_ppo_clipping_zeroes_it():
    logp = torch.log(torch.tensor([[0.6, 0.3]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.4, 0.3]], dtype=torch.float64))  # token 0: r = 1.5 > 1.2
    adv, mask = torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    a, b = leaf(logp), leaf(logp)
    g_ppo = grad_of(grpo_loss(a, old, adv, mask, aggregation="token_mean")[0], a)
    g_cispo = grad_of(cispo_loss(b, old, adv, mask, eps_high=0.2)[0], b)
    assert g_ppo[0, 0] == 0  # PPO: clipped, no gradient
    torch.testing.assert_close(g_cispo, torch.tensor([[-1.2 * 2.0 / 2, -1.0 * 2.0 / 2]], dtype=torch.float64))


def test_cispo_equals_reinforce_when_no_ratio_reaches_the_cap():
    logp, old, _, mask, adv = make_batch(seed=7, spread=0.05)
    a, b = leaf(logp), leaf(logp)
    loss, m = cispo_loss(a, old, adv, mask, eps_high=5.0)
    assert m["clip_frac"] == 0
    weight = (logp - old).exp()
    reinforce = -(weight * adv.unsqueeze(1) * b * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, reinforce)
    torch.testing.assert_close(grad_of(loss, a), grad_of(reinforce, b))
    # and at r == 1 it is plain token-mean REINFORCE -A * logp
    c, d = leaf(logp), leaf(logp)
    plain = -(adv.unsqueeze(1) * d * mask).sum() / mask.sum()
    loss1, _ = cispo_loss(c, logp, adv, mask, eps_high=0.2)
    torch.testing.assert_close(loss1, plain)
    torch.testing.assert_close(grad_of(loss1, c), grad_of(plain, d))


def test_cispo_lower_bound():
    logp = torch.log(torch.tensor([[0.2, 0.5]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.4, 0.5]], dtype=torch.float64))  # token 0: r = 0.5
    adv, mask = torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    a = leaf(logp)
    loss, m = cispo_loss(a, old, adv, mask, eps_high=0.2, eps_low=0.2)
    torch.testing.assert_close(grad_of(loss, a), torch.tensor([[-0.8 / 2, -1.0 / 2]], dtype=torch.float64))
    assert m["clip_frac_low"] == 0.5
    _, m_none = cispo_loss(logp, old, adv, mask, eps_high=0.2)
    assert m_none["clip_frac"] == 0


# --- data-parallel sharding / gradient accumulation ----------------------------------------

SHARDS = [slice(0, 2), slice(2, 3), slice(3, 5)]  # uneven on purpose


def sharded(fn, logp, mask, **globals_):
    a = leaf(logp)
    total = sum(fn(a[s], mask[s], s, **globals_)[0] for s in SHARDS)
    return total, grad_of(total, a)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "fixed_len"])
def test_grpo_sharding_with_global_normaliser_equals_whole_batch(aggregation):
    logp, old, ref, mask, adv = make_batch(seed=8, spread=0.5)
    kw = dict(aggregation=aggregation, max_len=8, ref_logprobs=None, clip_high=0.28)
    a = leaf(logp)
    whole, _ = grpo_loss(a, old, adv, mask, **kw)
    g_whole = grad_of(whole, a)

    def shard(lp, m, s):
        return grpo_loss(lp, old[s], adv[s], m, num_tokens=mask.sum(), num_sequences=B, **kw)

    total, g = sharded(shard, logp, mask)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g, g_whole)


def test_token_mean_without_global_count_is_not_shard_invariant():
    logp, old, _, mask, adv = make_batch(seed=8, spread=0.5)
    whole, _ = grpo_loss(logp, old, adv, mask, aggregation="token_mean")
    local = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], aggregation="token_mean")[0] for s in SHARDS)
    assert not torch.isclose(local / len(SHARDS), whole)  # why num_tokens exists


def test_cispo_sharding_with_global_num_tokens():
    logp, old, _, mask, adv = make_batch(seed=9, spread=0.5)
    a = leaf(logp)
    whole, _ = cispo_loss(a, old, adv, mask, eps_high=0.2)
    g_whole = grad_of(whole, a)
    total, g = sharded(lambda lp, m, s: cispo_loss(lp, old[s], adv[s], m, eps_high=0.2, num_tokens=mask.sum()),
                       logp, mask)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(g, g_whole)


def test_per_token_advantages_equal_broadcast_sequence_advantages():
    logp, old, ref, mask, adv = make_batch(seed=10, spread=0.5)
    per_token = adv.unsqueeze(1).expand(B, T).clone()
    per_token[~mask.bool()] = float("nan")  # padding is ignored
    for fn in (
        lambda a: grpo_loss(logp, old, a, mask, ref_logprobs=ref, kl_coef=0.1, neg_adv_drop_ratio=1.2)[0],
        lambda a: cispo_loss(logp, old, a, mask, eps_high=0.2)[0],
    ):
        torch.testing.assert_close(fn(per_token), fn(adv))


def test_metrics_are_detached_scalars():
    logp, old, ref, mask, adv = make_batch()
    a = leaf(logp)
    for _, metrics in (
        grpo_loss(a, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, delta=2.0, neg_adv_drop_ratio=2.0),
        cispo_loss(a, old, adv, mask, eps_high=0.2),
    ):
        for k, v in metrics.items():
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
            assert torch.isfinite(v), k


def test_bf16_inputs_are_promoted():
    logp, old, _, mask, adv = make_batch()
    loss, _ = grpo_loss(logp.bfloat16(), old.bfloat16(), adv, mask)
    assert loss.dtype == torch.float32
