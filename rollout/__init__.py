"""posttrain.rollout: generation engines (hf, native), sampling, rewards, the rollout worker.

Imports posttrain.models and posttrain.data only (never the orchestration package).

Token-in / token-out; log-prob convention in posttrain.rollout.types. Engines are imported
lazily by the worker (ENGINES mapping) so importing this package stays light.
"""
from posttrain.rollout.rewards import (
    REWARDS, RewardConfig, RewardFn, RewardRunner, resolve_callable, resolve_reward,
)
from posttrain.rollout.sampling import early_stop_length, request_generator, sample_tokens
from posttrain.rollout.types import (
    Completion, FinishReason, RolloutBatch, RolloutEngine, SamplingConfig, SamplingParams,
)
from posttrain.rollout.weights import load_named_tensors, weight_buckets
from posttrain.rollout.worker import (
    ENGINES, RolloutConfig, RolloutWorker, build_engine, default_engine, generate_on_model, rollout_metrics,
)

__all__ = [
    "Completion", "FinishReason", "RolloutBatch", "RolloutEngine", "SamplingConfig", "SamplingParams",
    "load_named_tensors", "weight_buckets",
    "sample_tokens", "request_generator", "early_stop_length",
    "REWARDS", "RewardConfig", "RewardFn", "RewardRunner", "resolve_callable", "resolve_reward",
    "ENGINES", "RolloutConfig", "RolloutWorker", "build_engine", "default_engine", "generate_on_model",
    "rollout_metrics",
]
