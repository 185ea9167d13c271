"""A user's own policy loss, in a user's own module: REINFORCE with a symmetrically clipped
importance weight.

Use it from an rl stage of a recipe (the module must be importable, e.g. installed or on
PYTHONPATH)::

    loss: {kind: custom, fn: "custom_loss:clipped_reinforce", args: {clip: 0.3}}

and test it with posttrain.testing (tests/testing/test_example_loss.py does), or run this file:
``python examples/custom_loss.py`` prints every check's report.
"""
from __future__ import annotations

import math

from torch import Tensor


def clipped_reinforce(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                      num_tokens: float, clip: float = 0.2, is_weight: Tensor | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean REINFORCE whose importance weight is clipped symmetrically in log space.

    Per token, with ``r = pi / pi_old``::

        w    = sg(clip(r, 1 / (1 + clip), 1 + clip))
        loss = -sum_it is_weight_it * w_it * A_i * log pi(o_it) * m_it / num_tokens

    Shapes: ``logprobs``, ``old_logprobs``, ``mask``, ``is_weight`` ``[B, T]``; ``advantages`` ``[B]``.
    Normaliser: ``num_tokens``, the optimizer step's global token count, so the micro-batch
    losses of one step sum to the step's token mean. Like CISPO every token keeps a gradient
    (the weight is detached, not the log-prob); unlike it, the bounds are symmetric around 1
    (a ratio of 1/2 and one of 2 are damped alike). Metrics: ``clip_frac`` and ``weight_mean``,
    token means over this micro-batch.
    """
    m = mask.to(logprobs.dtype)
    bound = math.log1p(clip)
    # Clamping log r before exp keeps a very stale token from overflowing (exp(89) = inf in fp32).
    log_r = (logprobs - old_logprobs).detach()
    w = log_r.clamp(-bound, bound).exp()  # [B, T]
    if is_weight is not None:
        w = w * is_weight
    loss = -(w * advantages.unsqueeze(1) * logprobs * m).sum() / num_tokens
    tokens = m.sum().clamp(min=1.0)  # metrics only; an all-masked micro-batch reports 0
    metrics = {
        "loss": loss.detach(),
        "clip_frac": ((log_r.abs() > bound).to(m.dtype) * m).sum() / tokens,
        "weight_mean": (w * m).sum() / tokens,
    }
    return loss, metrics


if __name__ == "__main__":
    from posttrain.testing import check_policy_loss

    for report in check_policy_loss(clipped_reinforce, args={"clip": 0.3}):
        print(report)
