"""RolloutWorker: a plain class that owns one engine and the policy version of its weights.

No Ray here: the cluster code wraps this class with `ray.remote` where the cluster is built, so
the worker is testable in-process.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from posttrain.models import ModelConfig
from posttrain.rollout.types import Completion, RolloutBatch, RolloutEngine, SamplingParams
from posttrain.rollout.weights import weight_buckets


@dataclass(frozen=True)
class RolloutConfig:
    """A rollout engine (the recipe's `rollout:` of rl stages and `pairs.rollout:` of dpo stages).
    Checked when built; invalid values raise ValueError("<field>: ...")."""

    engine: Optional[Literal["hf", "native", "vllm"]] = None  # a key of ENGINES; null: native for our hybrid, hf otherwise
    max_slots: int = 64  # native: decode slots (its max batch); hf: rows per transformers generate call; vllm: max_num_seqs
    # native: KV capacity per slot, null = longest prompt + max_new_tokens; vllm: max_model_len,
    # null = the model's max_position_embeddings; hf with cuda_graphs: the static cache's length
    # (a call that needs more gets its bucket), null = per call, the next power of two >= longest
    # prompt + max_new_tokens (at least 256)
    max_len: Optional[int] = None
    weight_bucket_mb: float = 64.0  # weight sync moves and loads at most this many MiB at a time
    # vllm: MiB for softmax layers' KV cache and lightning layers' states; null: vLLM's default
    # share of the device (on CPU: gpu_memory_utilization of RAM)
    kv_cache_mb: Optional[float] = 256.0
    # The decode step as a CUDA graph, on a CUDA device. native: a generate call that decodes
    # past a few steps captures its step once and replays it (one launch per step instead of a
    # few hundred kernels; 3.4-4x the eager step's tokens/s on an H200, docs/benchmarks.md).
    # hf: transformers' static KV cache (length bucketed, or max_len) and its decode step
    # compiled by torch.compile's reduce-overhead mode, for models transformers compiles whole
    # (Qwen2, Llama, ...; not MiniMax), whose last two caches stay on the GPU between calls (K and
    # V of every layer for rows x length). null: on where it applies, falling back to eager
    # decoding with a warning if a capture or compile fails; true: required (a failure is an
    # error; vllm, and hf on a model that cannot compile, are refused); false: off
    cuda_graphs: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.engine is not None and self.engine not in ENGINES:
            raise ValueError(f"engine: {self.engine!r} is not one of {sorted(ENGINES)}")
        if self.cuda_graphs is True and self.engine == "vllm":
            raise ValueError("cuda_graphs: the native and hf engines' setting (engine is 'vllm', which captures "
                             "its own graphs)")
        if not self.max_slots >= 1:
            raise ValueError(f"max_slots: must be >= 1, got {self.max_slots}")
        if self.max_len is not None and not self.max_len >= 1:
            raise ValueError(f"max_len: must be null or >= 1, got {self.max_len}")
        if not 0 < self.weight_bucket_mb < float("inf"):
            raise ValueError(f"weight_bucket_mb: must be a finite number > 0, got {self.weight_bucket_mb}")
        if self.kv_cache_mb is not None and not 0 < self.kv_cache_mb < float("inf"):
            raise ValueError(f"kv_cache_mb: must be null or a finite number > 0, got {self.kv_cache_mb}")


def default_engine(model: nn.Module) -> str:
    """The engine for a model when the recipe names none: native for our hybrid, else hf."""
    from posttrain.models import HybridForCausalLM

    return "native" if isinstance(model, HybridForCausalLM) else "hf"


def build_engine(model: nn.Module, config: RolloutConfig) -> RolloutEngine:
    """The engine `config` names (or the model's default) on `model`."""
    engine = config.engine or default_engine(model)
    return ENGINES[engine](model, config)


def check_engine(config: RolloutConfig, minimax: bool, hf_compiles: Callable[[], bool]) -> None:
    """The engine `config` resolves to can serve the model, checked when the recipe loads (the
    same rules build_engine and the engines apply later, inside the workers): `minimax` is the
    model's family (our hybrid for native, transformers' MiniMax classes for hf);
    `hf_compiles()` whether transformers compiles the hf engine's model whole (asked only for
    hf with cuda_graphs true). Raises ValueError("engine: ..." / "cuda_graphs: ...")."""
    engine = config.engine or ("native" if minimax else "hf")
    if engine == "native" and not minimax:
        raise ValueError("engine: 'native' needs a MiniMax hybrid model (this one is not: use 'hf' or 'vllm')")
    if config.cuda_graphs is True and engine == "hf" and (minimax or not hf_compiles()):
        raise ValueError("cuda_graphs: true, but transformers cannot compile this model whole for the hf engine's "
                         "decode step (set it to null or false)" + (", or use the native engine" if minimax else ""))


@torch.no_grad()
def generate_on_model(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                      config: Optional[RolloutConfig] = None) -> list[list[int]]:
    """params.n completions per prompt (token ids, stop token kept), prompt-major, generated by
    an engine built on `model` itself, in eval mode (its previous mode is restored).

    Module-level so LearnerGroup.call_rank0 runs it on a learner's own weights: held-out greedy
    evals and the sampled candidates of DPO pairs. There the default cuda_graphs (null) means
    off: a learner's module may carry ZeRO-3 gather hooks, which a graph capture must not meet;
    `true` in the config still asks for graphs."""
    from posttrain.models import eval_mode

    config = config or RolloutConfig()
    if config.cuda_graphs is None:
        config = dataclasses.replace(config, cuda_graphs=False)
    with eval_mode(model):
        engine = build_engine(model, config)
        return [list(c.token_ids) for c in engine.generate([list(p) for p in prompts], params)]


def _build_hf(model: nn.Module, config: RolloutConfig) -> RolloutEngine:
    from posttrain.rollout.hf_engine import HFEngine

    return HFEngine(model, max_batch=config.max_slots, cuda_graphs=config.cuda_graphs, max_len=config.max_len)


def _build_native(model: nn.Module, config: RolloutConfig) -> RolloutEngine:
    from posttrain.rollout.native import NativeEngine

    return NativeEngine(model, num_slots=config.max_slots, max_len=config.max_len, cuda_graphs=config.cuda_graphs)


def _build_vllm(model: nn.Module, config: RolloutConfig) -> RolloutEngine:
    from posttrain.rollout.vllm_engine import engine_for_model

    return engine_for_model(model, max_num_seqs=config.max_slots, max_model_len=config.max_len,
                            kv_cache_mb=config.kv_cache_mb)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Engine name -> builder(model, config).
ENGINES: dict[str, Callable[[nn.Module, RolloutConfig], RolloutEngine]] = {
    "hf": _build_hf,
    "native": _build_native,
    "vllm": _build_vllm,
}


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
        self.engine: RolloutEngine = build_engine(model, config)

    @classmethod
    def from_model_config(cls, config: RolloutConfig, model_config: ModelConfig, *, device: Any = "cpu",
                          **token_ids: Any) -> "RolloutWorker":
        """Build the engine's model from the run's ModelConfig on `device` (token_ids: vocab_size
        and special ids, as for posttrain.models.build_model).

        engine null: posttrain.models.build_model (the learner's own loading path), then the
        model's default engine (native for our hybrid, hf otherwise).
        native: build_model (our HybridForCausalLM; a non-MiniMax path fails).
        vllm: build_model (ours for MiniMax, AutoModelForCausalLM otherwise), written to a
        temporary directory that vLLM loads (our hybrid through posttrain.rollout.vllm_plugin).
        hf: transformers' own classes, the reference: AutoModelForCausalLM for a path,
        MiniMaxForCausalLM of the preset's config for a preset (random weights until the first
        update_weights). Its LM head runs in the model dtype (fp32 only when the model is fp32).
        """
        from posttrain.models import HybridForCausalLM, build_model, preset_config

        dtype = _DTYPES[model_config.dtype]
        if config.engine in (None, "native", "vllm"):
            model = build_model(model_config, **token_ids)
            if config.engine == "native" and not isinstance(model, HybridForCausalLM):
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
        return cls(config, model.to(device).eval())

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
