"""Types shared by every rollout engine: sampling parameters, completions, the engine Protocol.

Generation is token-in / token-out: prompts arrive as token ids, completions leave as the exact
token ids the engine sampled plus the engine's own fp32 log-probs of those tokens.

Log-prob convention (all engines, documented once here):
    logprobs[t] = log_softmax(logits_t / T)[token_ids[t]]        computed in fp32
where `logits_t` are the raw LM-head logits (fp32 LM head) and T the sampling temperature.
Top-k / top-p only decide *which* tokens may be drawn; the returned log-prob is NOT
renormalised over the kept set, because the learner recomputes exactly log softmax(logits / T)
of the same ids with its own forward pass, and the two must be comparable (TIS/MIS corrections,
mismatch metrics). Greedy decoding (T == 0) reports log_softmax(logits) (i.e. T = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

FinishReason = Literal["stop", "length", "truncated"]


@dataclass(frozen=True)
class SamplingConfig:
    """How a prompt's completions are sampled: the recipe's `sampling:` (rl stages) and
    `pairs.sampling:` (dpo pairs sampled from the policy). Checked when built; invalid values
    raise ValueError("<field>: ...")."""

    n: int = 8  # completions per prompt (GRPO's group size G; the candidates of a DPO pair)
    temperature: float = 1.0  # 0 is greedy (argmax); otherwise logits are divided by it
    top_p: float = 1.0  # nucleus sampling; 1.0 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    max_new_tokens: int = 256  # completion budget; a sample cut here ends with finish_reason "length"
    # MiniMax-M1 early truncation: a sample stops once early_stop_run consecutive sampled tokens
    # each had probability > early_stop_prob (the run-completing token is kept; finish_reason
    # "truncated"). None disables.
    early_stop_run: Optional[int] = None
    early_stop_prob: float = 0.99  # the per-token probability a run must exceed

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, "n", f"must be >= 1, got {self.n}"),
            (self.temperature >= 0.0 and math.isfinite(self.temperature), "temperature",
             f"must be a finite number >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"),
            (self.early_stop_run is None or self.early_stop_run >= 1, "early_stop_run",
             f"must be null or >= 1, got {self.early_stop_run}"),
            (0.0 < self.early_stop_prob < 1.0, "early_stop_prob", f"must be in (0, 1), got {self.early_stop_prob}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SamplingParams(SamplingConfig):
    """One generation request: a SamplingConfig plus what only the caller knows.

    n defaults to 1 here (a request for one completion per prompt unless asked).
    stop_token_ids: generation of a sample ends after it emits one of these (the stop token is
        kept in `token_ids`, so the learner trains on it); finish_reason "stop".
    seed: None uses the process RNG; an int makes sampling reproducible (same seed + same
        prompts -> same completions, independent of slot count / scheduling in `native`).
    """

    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # Accept any iterable of ints for stop ids but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def of(cls, config: SamplingConfig, *, stop_token_ids: Sequence[int] = (), seed: Optional[int] = None
           ) -> "SamplingParams":
        """The request for `config`'s sampling with the caller's stop ids and seed."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(SamplingConfig)},
                   stop_token_ids=tuple(stop_token_ids), seed=seed)


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of prompt `prompt_index` (its `sample_index`-th of n).

    token_ids and logprobs have the same length; logprobs follow the module convention.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion(prompt {self.prompt_index}, sample {self.sample_index}): "
                f"{len(self.token_ids)} token ids but {len(self.logprobs)} logprobs"
            )


@dataclass(frozen=True)
class RolloutBatch:
    """What a RolloutWorker returns: completions (prompt-major, groups of n consecutive) plus the
    policy version of the weights that generated all of them."""

    completions: list[Completion]
    policy_version: int
    num_prompts: int
    n: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine. `generate` returns len(prompts) * params.n completions ordered
    prompt-major (all samples of prompt 0, then prompt 1, ...), so GRPO groups are consecutive.

    `load_weights` copies any subset of the model's named tensors (a bucket) into the engine's
    weights in place; unknown names raise. `policy_version` is set by whoever loads weights.
    """

    policy_version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        ...
