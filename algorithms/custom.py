"""User-written losses: the calling convention they follow, and how the stages call them.

A recipe can name its own loss (``loss: {kind: custom, fn: "my_pkg.losses:my_loss", args: {...}}``).
The learner then calls it exactly where it calls a built-in loss, with the same tensors and
the same global normalisers, so a custom loss must follow the convention of the built-in
one it replaces. ``posttrain.testing`` checks a loss against these conventions on toy inputs.

Policy losses (``rl`` stage; the convention of :func:`~posttrain.algorithms.grpo_loss`)::

    fn(logprobs, old_logprobs, advantages, mask, *, num_tokens, num_sequences=..., ref_logprobs=None,
       is_weight=None, **args) -> (loss, metrics)

- ``logprobs`` ``[B, T]``: log pi(token) of the sampled completion tokens under the policy
  being trained (carries the gradient); 0 at padding and prompt positions.
- ``old_logprobs`` ``[B, T]``: the same under the policy that sampled the batch (detached;
  equal to ``logprobs.detach()`` when each batch gets one update).
- ``advantages`` ``[B]``: one per sequence (group-relative, see ``group_advantages``).
- ``mask`` ``[B, T]``: float 0/1, 1 on the completion tokens that carry a loss. A row may be all
  zero (a masked truncated completion); so may a whole micro-batch.
- ``ref_logprobs`` ``[B, T]`` (frozen reference policy, present when the stage has one) and
  ``is_weight`` ``[B, T]`` (detached TIS/MIS rollout correction, present when configured).
- ``num_tokens`` / ``num_sequences``: the *global* counts of the optimizer step (summed over
  micro-batches and data-parallel ranks), never this micro-batch's. The learner *sums* the
  gradients of all micro-batch losses of a step, so a micro-batch's loss must be its share
  of the global-batch loss: e.g. ``sum(per_token * mask) / num_tokens`` (token mean) or
  ``sum_i mean_t(per_token_i) / num_sequences`` (sequence mean).

Preference losses (``dpo`` stage; the convention of :func:`~posttrain.algorithms.dpo_loss`)::

    fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, num_pairs,
       chosen_lengths=None, rejected_lengths=None, **args) -> (loss, metrics)

- ``*_logps`` ``[B]``: sequence log-probs (sum over the response tokens) of B pairs under the
  policy (``chosen_logps``, ``rejected_logps`` carry the gradient) and the frozen reference.
- ``chosen_lengths`` / ``rejected_lengths`` ``[B]``: response token counts (float).
- ``num_pairs``: the global pair count of the optimizer step; normalise by it (``sum / num_pairs``).

Both return ``loss``, a 0-dim tensor, and ``metrics``, a dict of detached 0-dim tensors
(or floats) logged like the built-in losses' metrics. ``args`` are the recipe's ``loss.args``,
passed as keyword arguments. The optional conventional keywords (``num_sequences``,
``ref_logprobs``, ``is_weight``; ``chosen_lengths``, ``rejected_lengths``) are passed only to a
function that declares them (or takes ``**kwargs``), so ``cispo_loss``, which has no
``num_sequences``, fits as well as ``grpo_loss``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import Tensor

POLICY_POSITIONAL = ("logprobs", "old_logprobs", "advantages", "mask")
POLICY_REQUIRED = "num_tokens"
POLICY_OPTIONAL = ("num_sequences", "ref_logprobs", "is_weight")

PREFERENCE_POSITIONAL = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
PREFERENCE_REQUIRED = "num_pairs"
PREFERENCE_OPTIONAL = ("chosen_lengths", "rejected_lengths")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature(fn: Any) -> inspect.Signature | str:
    if not callable(fn):
        return f"is not callable (got {type(fn).__name__})"
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return "has no readable signature (a builtin?); wrap it in a Python function"


def _signature_error(fn: Any, args: dict[str, Any] | None, positional: tuple[str, ...], required: str,
                     optional: tuple[str, ...]) -> str | None:
    sig = _signature(fn)
    if isinstance(sig, str):
        return sig
    args = dict(args or {})
    params = list(sig.parameters.values())
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    var_pos = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    pos = [p for p in params if p.kind in _POSITIONAL]
    if len(pos) < len(positional) and not var_pos:
        return (f"takes {len(pos)} positional parameter(s), needs {len(positional)} "
                f"({', '.join(positional)})")
    bound_by_position = {p.name for p in pos[: len(positional)]}
    by_name = {p.name: p for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL
               and p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in bound_by_position}
    keywords = [n for n, p in by_name.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    if required not in keywords and not var_kw:
        return f"does not accept the keyword {required!r} (the optimizer step's global count)"
    for key in args:
        if key in (*positional, required, *optional) or key in bound_by_position:
            return f"args key {key!r} is set by the stage, not by loss.args"
        if key not in keywords and not var_kw:
            free = [k for k in keywords if k not in (required, *optional)]
            return f"does not accept args key {key!r} (its own keyword parameters: {', '.join(free) or 'none'})"
    given = {required, *args, *(o for o in optional if o in by_name or var_kw)}
    for name, p in by_name.items():
        if p.default is inspect.Parameter.empty and name not in given:
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                return f"positional-only parameter {name!r} beyond the {len(positional)} conventional ones has no default"
            return f"parameter {name!r} has no default and is not in args"
    return None


def policy_loss_signature_error(fn: Any, args: dict[str, Any] | None = None) -> str | None:
    """Why ``fn(logprobs, old_logprobs, advantages, mask, *, num_tokens, ..., **args)`` cannot be
    called (one line, without the function's name), or None when it can."""
    return _signature_error(fn, args, POLICY_POSITIONAL, POLICY_REQUIRED, POLICY_OPTIONAL)


def preference_loss_signature_error(fn: Any, args: dict[str, Any] | None = None) -> str | None:
    """Why ``fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, num_pairs,
    ..., **args)`` cannot be called (one line), or None when it can."""
    return _signature_error(fn, args, PREFERENCE_POSITIONAL, PREFERENCE_REQUIRED, PREFERENCE_OPTIONAL)


def _accepted(fn: Callable[..., Any], names: tuple[str, ...]) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return set(names)
    return {p.name for p in params if p.name in names and p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def _checked(fn: Callable[..., Any], out: Any) -> tuple[Tensor, dict[str, Any]]:
    """The learner sums losses and logs metrics: fail here, naming the function, if the
    result is not ``(0-dim tensor, dict)``."""
    name = getattr(fn, "__qualname__", repr(fn))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"loss {name} must return (loss, metrics), got {type(out).__name__}")
    loss, metrics = out
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"loss {name} must return a 0-dim tensor as its loss, got {shape}")
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"loss {name} must return a dict[str, Tensor] of metrics, got {type(metrics).__name__}")
    return loss, metrics


def call_policy_loss(fn: Callable[..., Any], logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                     mask: Tensor, *, num_tokens: Any, num_sequences: Any, ref_logprobs: Tensor | None = None,
                     is_weight: Tensor | None = None, args: dict[str, Any] | None = None
                     ) -> tuple[Tensor, dict[str, Any]]:
    """Call a policy loss under the convention above: ``num_sequences``, ``ref_logprobs`` and
    ``is_weight`` only if ``fn`` declares them (or takes ``**kwargs``); ``args`` as keywords."""
    optional = {"num_sequences": num_sequences, "ref_logprobs": ref_logprobs, "is_weight": is_weight}
    accepted = _accepted(fn, POLICY_OPTIONAL)
    kw = {k: v for k, v in optional.items() if k in accepted}
    out = fn(logprobs, old_logprobs, advantages, mask, num_tokens=num_tokens, **kw, **(args or {}))
    return _checked(fn, out)


def call_preference_loss(fn: Callable[..., Any], chosen_logps: Tensor, rejected_logps: Tensor,
                         ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, num_pairs: Any,
                         chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                         args: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Call a preference loss under the convention above: the lengths only if ``fn`` declares
    them (or takes ``**kwargs``); ``args`` as keywords."""
    optional = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    accepted = _accepted(fn, PREFERENCE_OPTIONAL)
    kw = {k: v for k, v in optional.items() if k in accepted}
    out = fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, num_pairs=num_pairs,
             **kw, **(args or {}))
    return _checked(fn, out)
