"""Stage kinds: each kind's typed config and its loop, in one mapping.

    kind  config          loop (posttrain/stages/<kind>.py)
    sft   SFTStageConfig  run_sft: supervised fine-tuning, short or long (packed) context
    dpo   DPOStageConfig  run_dpo: offline preference optimisation
    rl    RLStageConfig   run_rl: online GRPO / CISPO / custom loss with rollout workers

A stage config validates its own fields when it is built (`__post_init__`) and the checks that
need the cluster in `check_cluster`; both run when the recipe loads, before anything starts.
Adding a kind: a config class (a StageConfig with `kind: Literal["<kind>"]`), a loop
`run_<kind>(ctx, cfg, learners) -> manifest`, and one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from posttrain.stages.common import StageConfig, StageContext
from posttrain.stages.dpo import DPOStageConfig, run_dpo
from posttrain.stages.rl import RLStageConfig, run_rl
from posttrain.stages.sft import SFTStageConfig, run_sft


@dataclass(frozen=True)
class StageKind:
    config: type  # the kind's StageConfig subclass
    run: Callable[..., dict[str, Any]]  # run(ctx: StageContext, cfg, learners: Learners) -> manifest


STAGES: dict[str, StageKind] = {
    "sft": StageKind(SFTStageConfig, run_sft),
    "dpo": StageKind(DPOStageConfig, run_dpo),
    "rl": StageKind(RLStageConfig, run_rl),
}

# The recipe's `stages[i]`: one of the kinds' configs, chosen by its `kind` key.
AnyStageConfig = Union[tuple(k.config for k in STAGES.values())]  # type: ignore[valid-type]

__all__ = ["STAGES", "StageKind", "AnyStageConfig", "StageConfig", "StageContext",
           "SFTStageConfig", "DPOStageConfig", "RLStageConfig"]
