"""Input validation and masked reductions shared by the loss modules.

Every check raises ``ValueError`` naming the argument, so that a bad batch fails at the loss
with a message that says which tensor is wrong instead of producing a NaN loss three steps
later. The checks that look at values (finite, non-empty) synchronise with the device once
per call; a loss is called once per micro-batch, so that cost is negligible next to a
forward/backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_float(name: str, x: Tensor) -> Tensor:
    """Return ``x`` as a floating tensor of at least float32 precision.

    Ratios ``exp(logp - old_logp)`` computed in bf16 are off by percents, which is the size
    of the clip range, so everything below float32 is promoted (the promotion is
    differentiable).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        return x.to(torch.float32)
    if x.dtype in _LOW_PRECISION:
        return x.float()
    return x


def check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...], like: str) -> None:
    """Raise unless ``x.shape == shape`` (``like`` names the tensor that fixed the shape)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (the shape of {like})")


def check_2d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T] (2-D), got shape {tuple(x.shape)}")


def mask_bool(mask: Tensor) -> Tensor:
    """0/1 float or bool mask -> bool mask."""
    return mask if mask.dtype == torch.bool else mask != 0


def mask_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0/1 float or bool mask -> float mask of ``dtype`` (non-differentiable)."""
    return mask.detach().to(dtype)


def zero_masked(x: Tensor, keep: Tensor) -> Tensor:
    """Replace positions outside ``keep`` by 0 *before* any non-linearity.

    Padding positions may hold anything (-inf, NaN, stale values). Multiplying by the mask
    after ``exp`` would still give ``0 * inf = NaN`` in the forward or the backward pass;
    selecting first keeps both passes finite and the gradient at padding exactly zero.
    """
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_finite(name: str, x: Tensor, keep: Tensor | None = None) -> None:
    """Raise if ``x`` has NaN/inf (only at positions where ``keep`` is True, if given)."""
    bad = ~torch.isfinite(x.detach())
    if keep is not None:
        bad = bad & keep
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        count = int(bad.sum())
        where = f"index {tuple(idx)}" if len(idx) > 1 else f"index {idx[0]}"
        scope = " at unmasked positions" if keep is not None else ""
        raise ValueError(f"{name} has {count} non-finite value(s) (NaN/inf){scope}, first at {where}")


def check_positive_count(name: str, value: float | int | Tensor | None) -> None:
    """A user-supplied normaliser (num_tokens, num_sequences, max_len) must be > 0."""
    if value is None:
        return
    v = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if not v > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {v}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (float 0/1); 0 when the mask is empty. Detached callers only."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_max(x: Tensor, keep: Tensor) -> Tensor:
    """Max of ``x`` over ``keep``; NaN when empty (a metric, never a loss)."""
    if not bool(keep.any()):
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return x[keep].max()


def masked_min(x: Tensor, keep: Tensor) -> Tensor:
    if not bool(keep.any()):
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return x[keep].min()


def validate_token_inputs(
    logprobs: Tensor, mask: Tensor, **others: Tensor | None
) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:
    """Check the ``[B, T]`` tensors of a token-level loss and sanitise their padding.

    Returns ``(keep, maskf, cleaned)`` where ``keep`` is the bool mask, ``maskf`` the float
    mask in the compute dtype, and ``cleaned`` maps each name (``logprobs`` included) to the
    promoted tensor with masked-out positions set to 0. ``None`` entries pass through.
    """
    check_2d("logprobs", logprobs)
    check_shape("mask", mask, logprobs.shape, "logprobs")
    keep = mask_bool(mask)
    cleaned: dict[str, Tensor | None] = {}
    for name, x in {"logprobs": logprobs, **others}.items():
        if x is None:
            cleaned[name] = None
            continue
        check_shape(name, x, logprobs.shape, "logprobs")
        x = as_float(name, x)
        check_finite(name, x, keep)
        cleaned[name] = zero_masked(x, keep)
    maskf = mask_float(keep, cleaned["logprobs"].dtype)  # type: ignore[union-attr]
    return keep, maskf, cleaned


def validate_advantages(advantages: Tensor, keep: Tensor) -> Tensor:
    """``advantages`` is ``[B]`` (one per sequence) or ``[B, T]`` (per token, e.g. for packed
    rows); returns it detached as ``[B, 1]`` or ``[B, T]`` (0 at padding)."""
    if not isinstance(advantages, Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    b, t = keep.shape
    if tuple(advantages.shape) == (b, t) and advantages.dim() == 2:
        adv = as_float("advantages", advantages).detach()
        check_finite("advantages", adv, keep)
        return zero_masked(adv, keep)
    if advantages.dim() != 1 or advantages.shape[0] != b:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected ({b},): one value per sequence "
            f"of logprobs [B, T] (or ({b}, {t}) per token)"
        )
    adv = as_float("advantages", advantages).detach()
    check_finite("advantages", adv)
    return adv.unsqueeze(1)


def validate_weight(name: str, weight: Tensor | None, keep: Tensor) -> Tensor | None:
    """An optional detached multiplier on the policy term: ``[B]``, ``[B, 1]`` or ``[B, T]``."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(weight).__name__}")
    b, t = keep.shape
    if weight.dim() == 1 and weight.shape[0] == b:
        weight = weight.unsqueeze(1)
    if weight.dim() != 2 or weight.shape[0] != b or weight.shape[1] not in (1, t):
        raise ValueError(f"{name} has shape {tuple(weight.shape)}, expected ({b},), ({b}, 1) or ({b}, {t})")
    weight = as_float(name, weight).detach()
    check_finite(name, weight.expand(b, t), keep)
    return zero_masked(weight.expand(b, t), keep)


def grouped_values(name: str, values: Tensor, group_size: int) -> Tensor:
    """Validate a flat ``[N]`` tensor and view it as ``[N // G, G]``."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(values.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if values.numel() == 0 or values.numel() % group_size != 0:
        raise ValueError(f"{name} has {values.numel()} entries, not a positive multiple of group_size={group_size}")
    values = as_float(name, values).detach()
    check_finite(name, values)
    return values.view(-1, group_size)
