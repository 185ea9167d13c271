"""Objectives: model + micro-batch + the step's global counts -> (loss, metrics).

An objective is a frozen dataclass holding its own typed config (a loss of the recipe's tagged
union, the sampling it scores, the LM-head chunk size); the learner calls it as
`objective(model, micro_batch, counts)`. It runs the model, gathers per-token log-probs and
calls a pure loss from posttrain.algorithms. Metrics are returned as contributions that *sum*
to the step's value over micro-batches and ranks (each loss is already divided by the global
normaliser), so the learner only adds them up.

    sft.py   SFTObjective
    rl.py    PolicyObjective and the rl loss kinds (GRPOLoss, CISPOLoss, CustomPolicyLoss)
    dpo.py   DPOObjective and the dpo loss kinds (sigmoid, robust, ipo, hinge, custom)
"""
from posttrain.objectives.common import Objective, StepCounts, map_batches, segment_sums, target_logprobs
from posttrain.objectives.dpo import (
    PREF_TIE_NATS, AnyPreferenceBatch, CustomPreferenceLoss, DPOObjective, HingeDPOLoss, IPOLoss,
    PackedPreferenceBatch, PreferenceBatch, PreferenceLoss, RobustDPOLoss, SigmoidDPOLoss, preference_logprobs,
    reference_logprobs, sequence_logprobs,
)
from posttrain.objectives.rl import (
    CISPOLoss, CorrectionConfig, CustomPolicyLoss, GRPOLoss, PolicyLoss, PolicyObjective, RLBatch,
)
from posttrain.objectives.sft import SFTObjective

__all__ = [
    "Objective", "StepCounts", "map_batches", "segment_sums", "target_logprobs",
    "SFTObjective",
    "PolicyObjective", "PolicyLoss", "GRPOLoss", "CISPOLoss", "CustomPolicyLoss", "CorrectionConfig", "RLBatch",
    "DPOObjective", "PreferenceLoss", "SigmoidDPOLoss", "RobustDPOLoss", "IPOLoss", "HingeDPOLoss",
    "CustomPreferenceLoss", "PREF_TIE_NATS", "AnyPreferenceBatch", "PackedPreferenceBatch", "PreferenceBatch",
    "preference_logprobs", "reference_logprobs", "sequence_logprobs",
]
