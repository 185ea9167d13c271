"""Generation on a learner's own weights (evaluation), through the rollout engines.

Module-level so Ray can ship it to a learner actor by reference (LearnerGroup.call_rank0).
Our hybrid models decode with the native engine (recurrent state + softmax KV cache); any
other Hugging Face model with transformers `generate` (the hf engine).
"""
from __future__ import annotations

from typing import Sequence

import torch

from posttrain.rollout.types import SamplingParams
from posttrain.rollout.worker import ENGINES, RolloutConfig


def engine_name(model: torch.nn.Module) -> str:
    from posttrain.models.hybrid import HybridForCausalLM

    return "native" if isinstance(model, HybridForCausalLM) else "hf"


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    stop_token_ids: Sequence[int], max_slots: int = 64) -> list[list[int]]:
    """Greedy completions (token ids, stop token included) for each prompt."""
    was_training = model.training
    model.eval()
    try:
        engine = ENGINES[engine_name(model)](model, RolloutConfig(engine=engine_name(model), max_slots=max_slots))
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                stop_token_ids=tuple(stop_token_ids))
        return [list(c.token_ids) for c in engine.generate([list(p) for p in prompts], params)]
    finally:
        model.train(was_training)
