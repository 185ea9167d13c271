"""DeepSpeed ZeRO-3 on the learner: whole weights where code reads them outside a module's forward.

Under ZeRO-3 each rank keeps only a slice of every parameter (`p.data` is empty; the full shape is
`p.ds_shape`). DeepSpeed's module hooks gather a module's parameters for its own forward and
backward; code that reads a weight any other way sees the empty slice. Here:

- `whole(params)`: a block in which `params` are complete on every rank (an all-gather on entry:
  every rank must enter, in the same order) and *stay* complete even when a module that owns
  them runs its forward inside the block (its release hook would otherwise free them: the LM
  head tied to the input embeddings is read by `token_logprobs` after the embedding ran).
  Nested blocks gather only what the outer ones do not hold. A no-op without ZeRO-3.
- `Learner.call(fn)` runs fn with the whole model gathered (TRL's and OpenRLHF's choice for
  generation): engines call methods other than `forward` (the native engine's decode `step`)
  and read weights directly, which hooks do not see. The ranks then hold the 16-bit weights
  whole for the call. Functions marked `own_gathers` (weight sync, parameter counts) skip that
  and gather tensor by tensor themselves.
- `full_like(p)`: a meta tensor with p's full shape and dtype (bucket plans of a weight sync).
- `set_moe_leaves(model)`: MoE blocks (any module with an `experts` child: our SparseMoE and the
  Hugging Face sparse MoE blocks) become ZeRO-3 leaf modules, gathered whole on entry, so ranks
  whose tokens pick different experts still run the same all-gathers.

Gathering is collective: a learner call that gathers must run on every rank (LearnerGroup fans
calls out under ZeRO-3, see posttrain.cluster).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

# ds_ids of the parameters an open `whole` block holds on this rank
_HELD: set[int] = set()
# A pseudo submodule id in `ds_active_sub_modules`: DeepSpeed does not release (re-partition) a
# parameter while that set is non-empty, so a module forward inside `whole` leaves it gathered.
_PIN = -1


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages (partitions) this parameter."""
    return hasattr(p, "ds_id")


def full_like(p: torch.Tensor) -> torch.Tensor:
    """p itself, or for a ZeRO-3 parameter a meta tensor of its full shape and dtype."""
    return torch.empty(p.ds_shape, dtype=p.dtype, device="meta") if is_partitioned(p) else p


def numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (ZeRO-3: not of this rank's slice)."""
    return int(p.ds_numel) if is_partitioned(p) else p.numel()


@contextlib.contextmanager
def whole(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """`params` complete on every rank for the block (see the module docstring)."""
    todo = {p.ds_id: p for p in params if is_partitioned(p) and p.ds_id not in _HELD}
    if not todo:
        yield
        return
    import deepspeed

    chosen = [todo[k] for k in sorted(todo)]  # the same order on every rank
    with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
        for p in chosen:
            _HELD.add(p.ds_id)
            p.ds_active_sub_modules.add(_PIN)
        try:
            yield
        finally:  # unpinned before GatheredParameters re-partitions (it refuses active parameters)
            for p in chosen:
                p.ds_active_sub_modules.discard(_PIN)
                _HELD.discard(p.ds_id)


def own_gathers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a learner-call function that gathers what it reads itself (or reads no weights):
    Learner.call does not gather the whole model for it."""
    fn.zero3_own_gathers = True
    return fn


def gathers_whole_model(fn: Any) -> bool:
    """Whether Learner.call gathers the whole model for `fn` under ZeRO-3 (unless `own_gathers`)."""
    return not getattr(fn, "zero3_own_gathers", False)


def head_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The LM head's parameters (read directly by the chunked log-prob path, posttrain.models.logprobs)."""
    head = model.get_output_embeddings()
    return list(head.parameters()) if head is not None else []


def moe_blocks(model: nn.Module) -> list[type]:
    """Classes of the model's MoE blocks: modules with an `experts` child (ModuleList or module)."""
    return sorted({type(m) for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)},
                  key=lambda c: c.__qualname__)


def set_moe_leaves(model: nn.Module) -> list[type]:
    """Mark the model's MoE blocks as ZeRO-3 leaf modules (before deepspeed.initialize); returns
    their classes (empty for a dense model)."""
    classes = moe_blocks(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return classes
