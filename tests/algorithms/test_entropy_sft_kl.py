"""token_entropy / token_logprobs, sft_loss, kl estimators: independent references."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms import kl_metrics, kl_penalty, sft_loss, token_entropy, token_logprobs


def test_token_entropy_matches_categorical_and_chunks():
    logits = torch.randn(2, 7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits), expected)
    torch.testing.assert_close(token_entropy(logits, chunk_size=3), expected)


def test_token_entropy_with_banned_tokens_and_bf16():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[torch.log(torch.tensor(2.0))]]))
    out = token_entropy(torch.randn(1, 2, 5).bfloat16())
    assert out.dtype == torch.float32


def test_token_logprobs_is_minus_cross_entropy():
    logits = torch.randn(2, 5, 9, dtype=torch.float64)
    tokens = torch.randint(0, 9, (2, 5))
    expected = -F.cross_entropy(logits.reshape(-1, 9), tokens.reshape(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)


def test_sft_hand_value_gradient_and_sharding():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.125, 0.3, 0.3]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, m = sft_loss(logp, mask)
    expected = -(torch.log(torch.tensor(0.5 * 0.25 * 0.125, dtype=torch.float64))) / 3
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -mask.double() / 3)
    # two shards normalised by the global token count add up to the whole
    parts = sft_loss(logp[:1], mask[:1], num_tokens=3)[0] + sft_loss(logp[1:], mask[1:], num_tokens=3)[0]
    torch.testing.assert_close(parts, loss)
    # the micro-batch NLL metric does not depend on num_tokens
    torch.testing.assert_close(sft_loss(logp, mask, num_tokens=100)[1]["nll"], m["nll"])


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_estimators_average_to_the_true_kl(name):
    # samples from pi; every estimator (k2 only approximately) should approach KL(pi || ref)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    true_kl = (pi * (pi / ref).log()).sum()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = kl_penalty(pi.log()[samples].view(1, -1), ref.log()[samples].view(1, -1), name).mean()
    tol = 0.002 if name != "k2" else 0.005
    assert abs(est.item() - true_kl.item()) < tol


def test_k3_direction_and_kl_metrics():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    x = ref - logp  # log(pi_ref / pi)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), x.exp() - x - 1)
    m = kl_metrics(logp, ref, torch.tensor([[1.0, 0.0]]))
    assert m["kl_k1"].item() == pytest.approx(0.5)
    assert m["kl_k3"].item() == pytest.approx(float(torch.exp(torch.tensor(-0.5)) + 0.5 - 1))
