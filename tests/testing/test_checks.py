"""posttrain.testing: the built-in losses pass every check, and each deliberately broken loss
fails the check meant to catch it, with a message naming the invariance.

The fast checks run on toy tensors (milliseconds). The optimisation checks train the toy
hybrid for a few steps (~3 s each) and are marked slow.
"""
from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import cispo_loss, dpo_loss, grpo_loss
from posttrain.testing import (
    InvarianceError, check_policy_accumulation, check_policy_direction, check_policy_finite, check_policy_float64,
    check_policy_loss, check_policy_optimises, check_policy_sharding, check_preference_accumulation,
    check_preference_direction, check_preference_loss, check_preference_optimises, toy_transformer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD_POLICY = [
    pytest.param(grpo_loss, {"aggregation": "token_mean", "clip_high": 0.28}, id="grpo-token_mean"),
    pytest.param(grpo_loss, {"aggregation": "seq_mean"}, id="grpo-seq_mean"),
    pytest.param(cispo_loss, {"eps_high": 4.0}, id="cispo"),
]


# --- deliberately broken policy losses (each one bug) ----------------------------------------
def _reinforce_terms(logprobs, old_logprobs, advantages):
    ratio = torch.exp(logprobs - old_logprobs)
    return -ratio * advantages.unsqueeze(1)  # [B, T]


def local_normaliser(logprobs, old_logprobs, advantages, mask, *, num_tokens):
    """Divides by the micro-batch's own token count instead of the step's num_tokens."""
    return (_reinforce_terms(logprobs, old_logprobs, advantages) * mask).sum() / mask.sum().clamp(min=1), {}


def detached_ratio(logprobs, old_logprobs, advantages, mask, *, num_tokens):
    """The ratio is built from detached log-probs: a loss value but no gradient."""
    return (_reinforce_terms(logprobs.detach(), old_logprobs, advantages) * mask).sum() / num_tokens, {}


def sign_error(logprobs, old_logprobs, advantages, mask, *, num_tokens):
    """Maximises the surrogate instead of minimising it."""
    return -(_reinforce_terms(logprobs, old_logprobs, advantages) * mask).sum() / num_tokens, {}


def nan_on_empty_row(logprobs, old_logprobs, advantages, mask, *, num_tokens, num_sequences):
    """Per-sequence mean without guarding a row with no token (0 / 0)."""
    per_seq = (_reinforce_terms(logprobs, old_logprobs, advantages) * mask).sum(1) / mask.sum(1)
    return per_seq.sum() / num_sequences, {}


def bf16_autocast_sum(logprobs, old_logprobs, advantages, mask, *, num_tokens):
    """Sums each sequence with a matmul inside a bf16 autocast region (as a mixed-precision
    learner might run it): float32 inputs are summed in bfloat16 (float64 ones are not cast)."""
    ratio = torch.exp(logprobs - old_logprobs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_seq = ((ratio * mask) @ torch.ones(mask.shape[1], 1, dtype=ratio.dtype)).squeeze(1)  # [B]
    return -(per_seq.to(logprobs.dtype) * advantages).sum() / num_tokens, {}


# --- built-in losses pass -------------------------------------------------------------------
@pytest.mark.parametrize("fn,args", GOOD_POLICY)
def test_builtin_policy_losses_pass_the_tensor_checks(fn, args):
    reports = check_policy_loss(fn, args, optimise=False)
    assert [r.passed for r in reports] == [True] * 5, reports
    assert {r.name.split(" ")[0] for r in reports} == {"gradient", "data-parallel", "policy-gradient", "finite",
                                                      "float32"}


@pytest.mark.parametrize("args", [{}, {"loss_type": "ipo"}, {"loss_type": "hinge"}, {"rpo_alpha": 0.5}],
                         ids=["sigmoid", "ipo", "hinge", "rpo"])
def test_dpo_loss_passes_the_tensor_checks(args):
    reports = check_preference_loss(dpo_loss, args, optimise=False)
    assert [r.passed for r in reports] == [True] * 5, reports


@pytest.mark.slow
@pytest.mark.parametrize("negate", [False, True], ids=["reward", "negated"])
@pytest.mark.parametrize("fn,args", GOOD_POLICY)
def test_builtin_policy_losses_optimise_the_toy_task(fn, args, negate):
    report = check_policy_optimises(fn, args, negate=negate)
    assert report.passed and report.measured >= report.tolerance


@pytest.mark.slow
def test_dpo_loss_raises_the_margin_on_the_hybrid_and_on_a_transformer():
    assert check_preference_optimises(dpo_loss, {"beta": 0.1}).passed
    assert check_preference_optimises(dpo_loss, {"beta": 0.1}, policy=toy_transformer).passed


# --- broken losses fail the check that should catch them ------------------------------------------
@pytest.mark.parametrize("check,message", [
    (check_policy_accumulation, r"gradient accumulation 1x4 != 4x1: max \|grad diff\| / max \|grad\| = .* > tol 1e-06"),
    (check_policy_sharding, r"data-parallel sharding \(3 ranks: .* rows\) != global batch: max \|grad diff\|"),
])
def test_local_normaliser_breaks_accumulation_and_sharding(check, message):
    with pytest.raises(InvarianceError, match=message):
        check(local_normaliser)


def test_detached_ratio_has_no_gradient():
    with pytest.raises(InvarianceError, match="policy-gradient direction at ratio 1: no gradient reaches logprobs"):
        check_policy_direction(detached_ratio)


def test_sign_error_points_against_the_advantages():
    with pytest.raises(InvarianceError, match=r"-grad points against the advantages \(cosine -1.000 <= 0"):
        check_policy_direction(sign_error)


@pytest.mark.slow
def test_sign_error_fails_the_optimisation_check():
    with pytest.raises(InvarianceError, match=r"optimises its reward: mean reward .* rise -?[0-9.]+ < 0.2"):
        check_policy_optimises(sign_error, steps=4)


def test_nan_on_an_empty_row_fails_the_finite_check():
    with pytest.raises(InvarianceError, match="finite loss and gradients fails on an all-zero mask row: loss is nan"):
        check_policy_finite(nan_on_empty_row)


def test_bf16_arithmetic_fails_the_float64_check():
    with pytest.raises(InvarianceError, match=r"float32 != float64 re-computation: max \|grad diff\| .* > tol 1e-04"):
        check_policy_float64(bf16_autocast_sum)


def test_check_policy_loss_names_every_broken_invariance():
    with pytest.raises(InvarianceError) as err:
        check_policy_loss(local_normaliser, optimise=False)
    text = str(err.value)
    assert text.startswith("2 of 5 checks failed")
    assert "gradient accumulation 1x4 != 4x1" in text and "data-parallel sharding" in text
    assert [r.passed for r in err.value.reports] == [False, False, True, True, True]


def test_check_policy_loss_rejects_a_signature_first():
    with pytest.raises(InvarianceError, match="calling convention: cispo_loss parameter 'eps_high' has no default"):
        check_policy_loss(cispo_loss, {}, optimise=False)


# --- broken preference losses ---------------------------------------------------------------------
def dpo_local_pairs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, num_pairs):
    d = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -torch.nn.functional.logsigmoid(0.1 * d).mean(), {}  # mean over the micro-batch's pairs


def dpo_flipped(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, num_pairs):
    d = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -torch.nn.functional.logsigmoid(-0.1 * d).sum() / num_pairs, {}


def test_preference_local_normaliser_breaks_accumulation():
    with pytest.raises(InvarianceError, match=r"gradient accumulation 1x4 != 4x1"):
        check_preference_accumulation(dpo_local_pairs)


def test_preference_sign_error_is_caught():
    with pytest.raises(InvarianceError, match=r"preference direction at policy == reference: .* >= 0; a sign error"):
        check_preference_direction(dpo_flipped)


@pytest.mark.slow
def test_preference_sign_error_lowers_the_margin():
    with pytest.raises(InvarianceError, match=r"raises the chosen-minus-rejected margin: margin 0.00 -> -"):
        check_preference_optimises(dpo_flipped)
