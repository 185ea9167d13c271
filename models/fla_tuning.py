"""Pinned Triton configs for fla's chunked lightning-attention kernels, on GPUs where we measured them.

fla's `chunk_fwd_kernel_h` and `chunk_bwd_kernel_dh` (the inter-chunk state passes of
`chunk_simple_gla`, forward and backward) autotune over 48 configs (BK, BV x warps x stages)
for every new autotune key. The key holds the dtypes of every tensor argument, so each
combination of "initial state or not, final state or not, packed rows or not" is a new key, and
every process (each learner rank, each rollout engine) tunes again. On a fresh H200 with this
project's models that is ~8 keys x 48 compiles: session 13's first `posttrain run gpu` spent
353 s in its SFT stage (118 s with a warm Triton cache) and its long_sft stage then tuned
for minutes more before its first step.

Triton's autotuner skips benchmarking when a kernel has one config. `pin_fla_kernels` gives
the two 48-config kernels the config that Triton's autotuner chose on the GPU named in
`PINNED` (the same winner for every key it tuned there: heads of dim 128, chunk 64, bf16),
so a fresh machine starts training at once. The other kernels of the path (2-6 configs each)
still autotune: they are a few seconds. Any other GPU, or `POSTTRAIN_FLA_AUTOTUNE=1`, keeps
fla's autotuning untouched. A pinned config changes only speed: every config of the list
computes the same result.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Optional

__all__ = ["PINNED", "pinned_configs", "pin_fla_kernels", "pin_for", "ensure_pinned"]

# GPU name prefix (torch.cuda.get_device_name) -> kernel name -> config.
# Measured by Triton's autotuner in session 13 on an nvidia-h200 (48 configs per key, 5 keys of
# chunk_fwd_kernel_h and 2 of chunk_bwd_kernel_dh met by SFT and long_sft): BK = BV = 64, 4 warps,
# 2 stages won 5 of the 7 keys. On one more it was 6% behind the winner; on one packed-row
# forward key it took 0.075 ms against the winner's 0.028 ms (BK = BV = 32, 4 stages).
# The median config was 1.3-2.1x the winner.
PINNED: dict[str, dict[str, dict[str, Any]]] = {
    "NVIDIA H200": {
        "chunk_fwd_kernel_h": {"kwargs": {"BK": 64, "BV": 64}, "num_warps": 4, "num_stages": 2},
        "chunk_bwd_kernel_dh": {"kwargs": {"BK": 64, "BV": 64}, "num_warps": 4, "num_stages": 2},
    },
}

_ENV = "POSTTRAIN_FLA_AUTOTUNE"
_done = False


def pinned_configs(device_name: str, environ: Optional[dict] = None) -> dict[str, dict[str, Any]]:
    """The kernel configs to pin on `device_name` ({} when none are known or autotuning is asked for)."""
    env = os.environ if environ is None else environ
    if env.get(_ENV, "0") not in ("", "0"):
        return {}
    for prefix, configs in PINNED.items():
        if device_name.startswith(prefix):
            return configs
    return {}


def _autotuner(kernel: Any) -> Any:
    """The Triton Autotuner inside a kernel's decorator chain (heuristics -> autotune -> jit)."""
    from triton.runtime.autotuner import Autotuner

    obj = kernel
    while obj is not None and not isinstance(obj, Autotuner):
        obj = getattr(obj, "fn", None)
    if obj is None:
        raise TypeError(f"{getattr(kernel, '__name__', kernel)!r} is not an autotuned Triton kernel")
    return obj


def pin_fla_kernels(configs: dict[str, dict[str, Any]], modules: Iterable[Any]) -> list[str]:
    """Give each kernel named in `configs`, found in `modules`, that one config. Returns their names."""
    import triton

    pinned = []
    for module in modules:
        for name, cfg in configs.items():
            kernel = getattr(module, name, None)
            if kernel is None:
                continue
            tuner = _autotuner(kernel)
            tuner.configs = [triton.Config(dict(cfg["kwargs"]), num_warps=cfg["num_warps"],
                                           num_stages=cfg["num_stages"])]
            pinned.append(name)
    return pinned


def ensure_pinned(device: Any) -> list[str]:
    """Pin fla's kernels for `device`'s GPU, once per process (the first CUDA call of the fla path)."""
    global _done
    if _done:
        return []
    _done = True
    import torch

    return pin_for(torch.cuda.get_device_name(device))


def pin_for(device_name: str) -> list[str]:
    """Pin the kernels PINNED lists for `device_name`. Pinning only saves time, so an fla whose
    kernels moved or changed shape gets a warning and its own autotuning, not an error."""
    configs = pinned_configs(device_name)
    if not configs:
        return []
    try:
        from fla.ops.common import chunk_h

        return pin_fla_kernels(configs, [chunk_h])
    except (ImportError, TypeError) as e:
        warnings.warn(f"posttrain: fla's kernels not pinned ({e}); fla autotunes them", stacklevel=2)
        return []
