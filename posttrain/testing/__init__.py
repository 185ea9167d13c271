"""posttrain.testing: unit-test your own RL and preference losses on toy policies, before GPUs.

A custom loss follows the calling convention of the built-in one it replaces (documented in
posttrain.algorithms.custom). These checks prove, in seconds on a CPU, that it behaves like
a loss the learner can run::

    from posttrain.testing import check_policy_loss
    from my_pkg.losses import my_loss

    def test_my_loss():
        check_policy_loss(my_loss, args={"clip": 0.2})   # raises InvarianceError on a failure

Checks (each returns a CheckReport and raises InvarianceError, an AssertionError, naming the
invariance that broke and by how much):

- accumulation: gradient accumulation 1xN == Nx1 under the global normaliser;
- sharding: data-parallel ranks (uneven shards, each padded to its own width) == global batch;
- direction: at ratio 1 (policy == reference for preferences) minus the gradient follows the
  advantages (prefers the chosen response): a sign error or a detached ratio fails here;
- finite: masked rows, an all-masked micro-batch, log-ratios of +-30, zero advantages
  (preferences: huge margins, ties, long responses, a one-pair micro-batch);
- float64: float32 agrees with a float64 re-computation;
- optimise (toy policy, a few seconds): a few steps raise the toy task's reward and, with the
  reward negated, lower it (preferences: raise the chosen-minus-rejected margin).

Toys: ``char_tokenizer``, ``toy_hybrid`` (our tiny MiniMax hybrid), ``toy_transformer`` (a tiny
Qwen2), ``digit_task``/``non_digit_task`` (verifiable, ``ToyTask.negated``), loss inputs shaped as
the stages feed them (``policy_loss_inputs``, ``preference_loss_inputs``) and the rl stage's
own micro-batch (``rl_batch_from_samples``).
"""
from posttrain.testing.batches import (
    PolicyLossInputs, PreferenceLossInputs, policy_loss_inputs, preference_loss_inputs, rl_batch_from_samples,
)
from posttrain.testing.optimise import (
    check_policy_optimises, check_preference_optimises, train_policy, train_preference,
)
from posttrain.testing.policy_checks import (
    check_policy_accumulation, check_policy_direction, check_policy_finite, check_policy_float64, check_policy_loss,
    check_policy_sharding,
)
from posttrain.testing.preference_checks import (
    check_preference_accumulation, check_preference_direction, check_preference_finite, check_preference_float64,
    check_preference_loss, check_preference_sharding,
)
from posttrain.testing.report import CheckReport, InvarianceError
from posttrain.testing.toys import (
    ToyTask, char_tokenizer, digit_task, non_digit_task, policy_logprobs, preference_pairs, toy_hybrid,
    toy_transformer,
)

__all__ = [
    "CheckReport",
    "InvarianceError",
    "PolicyLossInputs",
    "PreferenceLossInputs",
    "ToyTask",
    "char_tokenizer",
    "check_policy_accumulation",
    "check_policy_direction",
    "check_policy_finite",
    "check_policy_float64",
    "check_policy_loss",
    "check_policy_optimises",
    "check_policy_sharding",
    "check_preference_accumulation",
    "check_preference_direction",
    "check_preference_finite",
    "check_preference_float64",
    "check_preference_loss",
    "check_preference_optimises",
    "check_preference_sharding",
    "digit_task",
    "non_digit_task",
    "policy_logprobs",
    "policy_loss_inputs",
    "preference_loss_inputs",
    "preference_pairs",
    "rl_batch_from_samples",
    "toy_hybrid",
    "toy_transformer",
    "train_policy",
    "train_preference",
]
