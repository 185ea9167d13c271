"""posttrain.rollout: generation engines (hf, native), sampling, rewards, the rollout worker.

Token-in / token-out; log-prob convention in posttrain.rollout.types. Engines are imported
lazily by the worker (ENGINES mapping) so importing this package stays light.
"""
from posttrain.rollout.rewards import REWARDS, RewardConfig, RewardFn, RewardRunner, resolve_reward
from posttrain.rollout.sampling import early_stop_length, request_generator, sample_tokens
from posttrain.rollout.types import Completion, FinishReason, RolloutBatch, RolloutEngine, SamplingParams
from posttrain.rollout.worker import ENGINES, RolloutConfig, RolloutWorker

__all__ = [
    "Completion", "FinishReason", "RolloutBatch", "RolloutEngine", "SamplingParams",
    "sample_tokens", "request_generator", "early_stop_length",
    "REWARDS", "RewardConfig", "RewardFn", "RewardRunner", "resolve_reward",
    "ENGINES", "RolloutConfig", "RolloutWorker",
]
