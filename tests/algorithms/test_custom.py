"""The custom-loss calling convention: which functions fit it, what is passed to them, and the
one-line reasons given for those that do not fit."""
import pytest
import torch

from posttrain.algorithms import cispo_loss, dpo_loss, grpo_loss, sft_loss
from posttrain.algorithms.custom import (
    call_policy_loss, call_preference_loss, policy_loss_signature_error, preference_loss_signature_error,
)


def batch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 4, generator=g)
    mask = torch.ones(3, 4)
    mask[1, 2:] = 0
    return logp, logp + 0.1, torch.tensor([1.0, -1.0, 0.5]), mask


@pytest.mark.parametrize("fn,args", [
    (grpo_loss, {}), (grpo_loss, {"aggregation": "token_mean", "clip_high": 0.28}),
    (cispo_loss, {"eps_high": 4.0}), (lambda a, b, c, d, **kw: None, {"anything": 1}),
])
def test_builtin_and_kwargs_losses_fit_the_policy_convention(fn, args):
    assert policy_loss_signature_error(fn, args) is None


def test_dpo_loss_fits_the_preference_convention():
    assert preference_loss_signature_error(dpo_loss, {"beta": 0.2, "loss_type": "ipo"}) is None


@pytest.mark.parametrize("fn,args,why", [
    (3, {}, "is not callable"),
    (sft_loss, {}, "takes 2 positional parameter(s), needs 4"),
    (dpo_loss, {}, "does not accept the keyword 'num_tokens'"),
    (cispo_loss, {}, "parameter 'eps_high' has no default and is not in args"),
    (cispo_loss, {"eps_high": 1.0, "clip": 0.2}, "does not accept args key 'clip' (its own keyword parameters: eps_high, eps_low)"),
    (grpo_loss, {"num_tokens": 5}, "args key 'num_tokens' is set by the stage"),
    (grpo_loss, {"mask": 1}, "args key 'mask' is set by the stage"),
    (lambda a, b, c, d, e, *, num_tokens: 0, {}, "parameter 'e' has no default"),
])
def test_policy_signature_errors_say_why(fn, args, why):
    assert policy_loss_signature_error(fn, args).startswith(why)


def test_preference_signature_errors_say_why():
    assert "'num_pairs'" in preference_loss_signature_error(grpo_loss, {})
    assert "'gamma'" in preference_loss_signature_error(dpo_loss, {"gamma": 1.0})


def test_call_policy_loss_passes_optional_keywords_only_where_declared():
    logp, old, adv, mask = batch()
    seen = {}

    def declared(logprobs, old_logprobs, advantages, mask, *, num_tokens, is_weight=None, scale=1.0):
        seen.update(num_tokens=num_tokens, is_weight=is_weight, scale=scale)
        return (logprobs * mask).sum() * scale / num_tokens, {}

    w = torch.ones_like(logp)
    call_policy_loss(declared, logp, old, adv, mask, num_tokens=20.0, num_sequences=6.0, ref_logprobs=old,
                     is_weight=w, args={"scale": 2.0})
    assert seen == {"num_tokens": 20.0, "is_weight": w, "scale": 2.0}  # no num_sequences / ref_logprobs

    def catch_all(*a, **kw):
        seen.clear()
        seen.update(kw)
        return a[0].sum(), {}

    call_policy_loss(catch_all, logp, old, adv, mask, num_tokens=20.0, num_sequences=6.0)
    assert set(seen) == {"num_tokens", "num_sequences", "ref_logprobs", "is_weight"}


def test_call_policy_loss_equals_direct_calls():
    logp, old, adv, mask = batch()
    for fn, kw in [(grpo_loss, {"aggregation": "seq_mean"}), (cispo_loss, {"eps_high": 0.2})]:
        got, _ = call_policy_loss(fn, logp, old, adv, mask, num_tokens=20.0, num_sequences=6.0, args=kw)
        extra = {"num_sequences": 6.0} if fn is grpo_loss else {}
        want, _ = fn(logp, old, adv, mask, num_tokens=20.0, **extra, **kw)
        torch.testing.assert_close(got, want)


def test_call_preference_loss_passes_lengths_to_ipo():
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    lengths = torch.tensor([3.0, 5.0])
    got, _ = call_preference_loss(dpo_loss, c, r, c - 0.5, r + 0.2, num_pairs=4.0, chosen_lengths=lengths,
                                  rejected_lengths=lengths, args={"loss_type": "ipo"})
    want, _ = dpo_loss(c, r, c - 0.5, r + 0.2, loss_type="ipo", num_pairs=4.0, chosen_lengths=lengths,
                       rejected_lengths=lengths)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("out,why", [
    (torch.zeros(()), "must return (loss, metrics)"),
    ((torch.zeros(2), {}), "0-dim tensor as its loss, got (2,)"),
    ((torch.zeros(()), [1]), "dict[str, Tensor] of metrics"),
])
def test_a_malformed_result_names_the_function(out, why):
    def bad(logprobs, old_logprobs, advantages, mask, *, num_tokens):
        return out

    with pytest.raises(TypeError, match="bad") as err:
        call_policy_loss(bad, *batch(), num_tokens=1.0, num_sequences=1.0)
    assert why in str(err.value)
