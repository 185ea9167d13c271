"""RolloutWorker: a plain class that owns one engine and the policy version of its weights.

No Ray here: the cluster code wraps this class with `ray.remote` where the cluster is built, so
the worker is testable in-process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from posttrain.config import ModelConfig
from posttrain.rollout.types import Completion, RolloutBatch, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class RolloutConfig:
    """engine: a key of ENGINES. max_slots: native decode slots (its max batch) / rows per
    transformers `generate` call for hf. max_len: native KV capacity per slot (prompt +
    completion); None sizes it per call as longest prompt + max_new_tokens.
    weight_bucket_mb: update_weights hands the engine at most this many MiB per load call."""

    engine: Literal["hf", "native"] = "native"
    max_slots: int = 32
    max_len: Optional[int] = None
    weight_bucket_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"RolloutConfig.engine: {self.engine!r} is not one of {sorted(ENGINES)}")
        if self.max_slots < 1:
            raise ValueError(f"RolloutConfig.max_slots must be >= 1, got {self.max_slots}")
        if self.weight_bucket_mb <= 0:
            raise ValueError(f"RolloutConfig.weight_bucket_mb must be > 0, got {self.weight_bucket_mb}")


def _build_hf(model: nn.Module, config: RolloutConfig) -> RolloutEngine:
    from posttrain.rollout.hf_engine import HFEngine

    return HFEngine(model, max_batch=config.max_slots)


def _build_native(model: nn.Module, config: RolloutConfig) -> RolloutEngine:
    from posttrain.rollout.native import NativeEngine

    return NativeEngine(model, num_slots=config.max_slots, max_len=config.max_len)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Engine name -> builder(model, config). "vllm" joins here when its engine exists.
ENGINES: dict[str, Callable[[nn.Module, RolloutConfig], RolloutEngine]] = {
    "hf": _build_hf,
    "native": _build_native,
}


def weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` (a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def rollout_metrics(completions: Sequence[Completion], seconds: float) -> dict[str, float]:
    """Throughput and how completions ended (fractions over completions)."""
    n = max(len(completions), 1)
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "rollout/tokens": float(tokens),
        "rollout/seconds": seconds,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "rollout/mean_length": tokens / n,
        "rollout/stop_frac": sum(c.finish_reason == "stop" for c in completions) / n,
        "rollout/length_frac": sum(c.finish_reason == "length" for c in completions) / n,
        "rollout/truncated_frac": sum(c.finish_reason == "truncated" for c in completions) / n,
    }


class RolloutWorker:
    """Owns a model and the engine built on it; generates and receives new weights."""

    def __init__(self, config: RolloutConfig, model: nn.Module) -> None:
        self.config = config
        self.engine: RolloutEngine = ENGINES[config.engine](model, config)

    @classmethod
    def from_model_config(cls, config: RolloutConfig, model_config: ModelConfig, **token_ids: Any) -> "RolloutWorker":
        """Build the engine's model from the run's ModelConfig (token_ids: vocab_size and special
        ids, as for posttrain.models.build_model).

        native: posttrain.models.build_model (our HybridForCausalLM; a non-MiniMax path fails).
        hf: transformers' own classes, the reference: AutoModelForCausalLM for a path,
        MiniMaxForCausalLM of the preset's config for a preset (random weights until the first
        update_weights). Its LM head runs in the model dtype (fp32 only when the model is fp32).
        """
        from posttrain.models import HybridForCausalLM, build_model, preset_config

        dtype = _DTYPES[model_config.dtype]
        if config.engine == "native":
            model = build_model(model_config, **token_ids)
            if not isinstance(model, HybridForCausalLM):
                raise ValueError(
                    f"rollout.engine='native' needs a MiniMax hybrid model; model.path={model_config.path} "
                    f"loads as {type(model).__name__} (use engine 'hf')"
                )
        elif model_config.path is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_config.path, dtype=dtype)
        else:
            from transformers import MiniMaxForCausalLM

            hf_config = preset_config(model_config.preset, model_config.overrides,
                                      fp32_lm_head=model_config.fp32_lm_head, **token_ids)
            model = MiniMaxForCausalLM(hf_config).to(dtype)
        return cls(config, model.eval())

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """len(prompt_ids) * params.n completions, prompt-major, stamped with the policy version."""
        version = self.engine.policy_version
        start = time.perf_counter()
        completions = self.engine.generate(prompt_ids, params)
        seconds = time.perf_counter() - start
        return RolloutBatch(
            completions=completions,
            policy_version=version,
            num_prompts=len(prompt_ids),
            n=params.n,
            metrics=rollout_metrics(completions, seconds),
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Load new weights bucket by bucket, then advance to `version`. Returns tensors loaded.

        The version changes only after every bucket loaded, so a failure mid-way leaves the old
        version number on partially new weights — callers must treat an exception as fatal.
        """
        if version < self.engine.policy_version:
            raise ValueError(f"update_weights: version {version} is older than current {self.engine.policy_version}")
        bucket_bytes = int(self.config.weight_bucket_mb * 2**20)
        count = 0
        for bucket in weight_buckets(named_tensors, bucket_bytes):
            self.engine.load_weights(bucket)
            count += len(bucket)
        self.engine.policy_version = version
        return count
