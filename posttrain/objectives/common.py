"""What every objective shares: the model's log-probs of a batch's targets, and running a
function over batches without gradients (reference and 'old' log-probs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import torch

from posttrain.data.collate import Batch, to_device
from posttrain.models import HybridForCausalLM, eval_mode, forward_hidden, token_logprobs
from posttrain.models.shared_prefix import plan_shared_prefixes, shared_prefix_hidden

T = TypeVar("T")


@dataclass(frozen=True)
class StepCounts:
    """Global counts of one optimizer step, across its micro-batches and learner ranks: the
    normalisers every objective divides by (so 1xN == Nx1 and world size 2 == 1)."""

    tokens: float = 0.0  # target tokens (sft: trained tokens; rl: completion tokens)
    sequences: float = 0.0  # sequences (rl: seq_mean / fixed_len normaliser); pairs in dpo


@dataclass(frozen=True)
class Gathered:
    """A per-micro-batch output of an objective that is not a summable metric (the rl objective's
    detached per-token log-probs of its own forward): Learner.train_step hands back every
    micro-batch's value as is, a list in micro-batch order under its metric key, and
    LearnerGroup.train_step joins the ranks' lists in rank order. Keep it small (CPU, only the
    tokens the driver needs): it crosses the Ray boundary."""

    value: torch.Tensor


class Objective(Protocol):
    """What a learner trains with: `objective(model, micro_batch, counts) -> (loss, metrics)`,
    the loss already divided by the step's global counts and metrics given as contributions
    that sum to the step's value over micro-batches and ranks (or `Gathered`, handed back whole).
    Frozen dataclasses in posttrain.objectives (picklable: Ray ships them whole)."""

    def __call__(self, model: torch.nn.Module, batch: Any, counts: StepCounts) -> tuple[torch.Tensor, dict[str, Any]]:
        ...


def target_logprobs(model: torch.nn.Module, batch: Batch, *, chunk_size: int, temperature: float = 1.0,
                    with_entropy: bool = False, share_prefixes: bool = False
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """log softmax(logits / temperature) of each target token `[B, T]` (0 where targets ==
    IGNORE_INDEX), its entropy `[B, T]` (or None) and the router aux loss (a scalar).

    The temperature is the sampling engine's (posttrain.rollout.types' log-prob convention);
    logits / T == head(hidden / T) because the LM head has no bias, so the chunked head of
    token_logprobs is reused unchanged.

    share_prefixes: rows of our hybrid model that start with the same untargeted prefix (an RL
    micro-batch: G samples per prompt) run that prefix once (posttrain.models.shared_prefix);
    the same values up to float rounding. CPU only (see _shared_prefix_logprobs)."""
    if share_prefixes:
        shared = _shared_prefix_logprobs(model, batch, chunk_size, temperature, with_entropy)
        if shared is not None:
            return shared
    # The attention mask keeps right padding out of the router loss and out of attention:
    # without it, padded positions (no loss of their own) feed exploding gradients back
    # through the lightning layers' output norm.
    hidden, aux = forward_hidden(model, batch.input_ids, position_ids=batch.position_ids,
                                 cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask)
    if temperature != 1.0:
        if model.get_output_embeddings().bias is not None:
            raise ValueError("sampling temperature != 1 needs an LM head without bias")
        hidden = hidden / temperature
    out = token_logprobs(model, hidden, batch.targets, chunk_size=chunk_size, with_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    return logp, entropy, aux


def _shared_prefix_logprobs(model: torch.nn.Module, batch: Batch, chunk_size: int, temperature: float,
                            with_entropy: bool) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
    """target_logprobs through shared_prefix_hidden, or None where it does not apply (another
    model, packed rows, custom positions, no shared prefix) or does not pay: on a GPU. There a
    micro-batch is bound by kernel launches, not arithmetic, and the shared-prefix path issues
    more of them: on an H200 (small-hybrid, bf16, 4 prompts x 8 samples;
    benchmarks/rl_learner_gpu.py) its forward+backward took 357 vs 325 ms for 2,048-token
    prompts and 413 vs 129 ms for 32-token ones, and its first call 126 s (fla tuning its
    initial-state kernels) against 1.5 s. On the CPU it is what made the demo's RL fast.
    Not under ZeRO-3 either: each layer runs twice in one forward (prefixes, then the rows' own
    tokens), and DeepSpeed's stage-3 gradient hooks then put a parameter twice into one reduce
    bucket (an assertion in backward; found by tests/posttrain/test_rl_learn_forwards.py)."""
    if (not isinstance(model, HybridForCausalLM) or batch.cu_seqlens is not None or batch.input_ids.is_cuda
            or any(hasattr(p, "ds_id") for p in model.parameters())):
        return None
    B, T = batch.input_ids.shape
    if batch.position_ids is not None and not torch.equal(
            batch.position_ids.cpu(), torch.arange(T).expand(B, T)):
        return None
    plan = plan_shared_prefixes(batch.input_ids, batch.targets, batch.attention_mask)
    if plan is None:
        return None
    hidden, positions, aux = shared_prefix_hidden(model, batch.input_ids, plan)  # [B, W, D], [B, W]
    if temperature != 1.0:
        if model.get_output_embeddings().bias is not None:
            raise ValueError("sampling temperature != 1 needs an LM head without bias")
        hidden = hidden / temperature
    inside = positions < T
    targets = torch.where(inside, batch.targets.gather(1, positions.clamp(max=T - 1)), -100)  # [B, W]
    out = token_logprobs(model, hidden, targets, chunk_size=chunk_size, with_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)

    def full(x: torch.Tensor) -> torch.Tensor:  # [B, W] -> [B, T]; positions are distinct per row
        W = x.shape[1]
        return x.new_zeros(B, T + W).scatter(1, positions, x)[:, :T]

    return full(logp), (full(entropy) if entropy is not None else None), aux


def draws_noise(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward is random as it stands (train mode with dropout p > 0, peft's
    adapter dropout included, a Hugging Face attention_dropout > 0, or our MoE router's jitter):
    then its log-probs are not the policy's own, which an eval-mode forward gives."""
    from posttrain.models.hybrid import SparseMoE

    if not model.training:
        return False
    config = getattr(model, "config", None)
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:  # HF attention: functional dropout
        return True
    return any((isinstance(m, torch.nn.Dropout) and m.p > 0) or (isinstance(m, SparseMoE) and m.jitter > 0)
               for m in model.modules())


@torch.no_grad()
def map_batches(model: torch.nn.Module, batches: Sequence[Any], fn: Callable[[torch.nn.Module, Any], T]) -> list[T]:
    """fn(model, batch) for each batch moved to the model's device, in eval mode and without
    gradients (the model's mode is restored): the frame of every log-prob pass that trains
    nothing (old / reference log-probs)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return [fn(model, to_device(b, device)) for b in batches]


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-document sums `[N]` of `values` `[T]` over the documents of cu_seqlens `[N + 1]`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [N]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths.to(values.device))
    return values.new_zeros(lengths.numel()).index_add(0, doc, values)
