"""The rl stage's learner phase (posttrain.stages.rl.learn) on learner ranks on Ray: with one
update per rollout batch (K = 1) it runs no separate no-grad pass for the old log-probs (the
training forward's own log-probs, handed back by every rank, give the mismatch metrics), and
those metrics equal mismatch_metrics of an explicit no-grad forward of the pre-update weights
over every completion token of the step. With K = 2 the old log-probs pass stays (the loss
needs it) and the metrics are the same too.

Cases: one rank; two ranks (each trains other micro-batches, so the metrics need both ranks'
tokens); two ZeRO-3 ranks; one rank whose train-mode forward is random (MoE router jitter),
where the metrics must still be those of the deterministic eval-mode forward. Samples share
their prompts in every case: under ZeRO-3 that used to fail in backward (the shared-prefix
forward runs each layer twice and DeepSpeed's stage 3 asserted a parameter reduced twice in one
bucket); ZeRO-3 now takes the full forward.

Tolerance: the explicit forward scores all samples as one padded batch, the stage as shuffled
micro-batches, so the log-probs agree to fp32 rounding (~1e-6); one update (lr 5e-2) moves the
metrics by far more than TOL (checked: the comparison can fail).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms import mismatch_metrics
from posttrain.cluster import LearnerGroup
from posttrain.config import ClusterConfig, DataConfig, LearnerConfig, ModelConfig, OptimConfig, ScheduleConfig
from posttrain.learner import join_rank_answers
from posttrain.objectives import GRPOLoss, PolicyObjective
from posttrain.rollout import Completion, SamplingConfig
from posttrain.stages.rl import FilterConfig, RLStageConfig, Sample, learn, to_rl_batch
from posttrain.zero3 import own_gathers

IDS = dict(vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYERS = {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
G, PROMPTS = 4, 4
TOL = 2e-5
SAMPLING = SamplingConfig(n=G, max_new_tokens=8, temperature=0.8)
OBJECTIVE = PolicyObjective(GRPOLoss(), SAMPLING)

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                reason="two-rank groups place one rank per GPU: needs 2 GPUs (or none)")


def samples(shared_prompts: bool = True) -> list[Sample]:
    """PROMPTS prompts x G completions of unequal lengths, engine log-probs made up (the metrics
    compare them with the learner's whatever they are), advantages varying within each group.
    shared_prompts=False: one more token makes each sample's prompt its own."""
    g = torch.Generator().manual_seed(0)
    out = []
    for p in range(PROMPTS):
        prompt = [1] + torch.randint(3, IDS["vocab_size"], (2 + p,), generator=g).tolist()
        for i in range(G):
            n = 3 + (p + i) % 4
            ids = torch.randint(3, IDS["vocab_size"], (n,), generator=g).tolist()
            lp = (-torch.rand(n, generator=g) * 4.0 - 0.1).tolist()
            own = prompt if shared_prompts else prompt + [3 + i]
            out.append(Sample(own, Completion(p, i, ids, lp, "stop"), 0.0, 0.0, float(i - 1.5)))
    return out


def explicit_mismatch(group: LearnerGroup, xs: list[Sample]) -> dict[str, float]:
    """What the stage logged before: mismatch_metrics of a no-grad forward on the learner (all
    samples in one padded batch) against the engine's log-probs."""
    b = to_rl_batch(xs, IDS["pad_token_id"], mask_truncated=False)
    [lrn] = group.call_rank0(OBJECTIVE.logprobs, [b])
    m = mismatch_metrics(lrn, b.rollout_logprobs, b.mask)
    return {f"mismatch/{k}": float(v) for k, v in m.items()}


# Forwards of the objective on rank 0: posttrain.objectives.rl's target_logprobs, wrapped in the
# learner's process (one call = one micro-batch forward, training or no-grad).
@own_gathers
def count_forwards(model: torch.nn.Module) -> None:
    import posttrain.objectives.rl as rl

    if not hasattr(rl, "_counted"):
        rl._counted, inner = [0], rl.target_logprobs

        def counted(*args, **kwargs):
            rl._counted[0] += 1
            return inner(*args, **kwargs)

        rl.target_logprobs = counted
    rl._counted[0] = 0


@own_gathers
def forwards(model: torch.nn.Module) -> int:
    import posttrain.objectives.rl as rl

    return rl._counted[0]


def stage(K: int) -> RLStageConfig:
    return RLStageConfig(name="t", data=DataConfig(format="rl", task="arithmetic"), steps=1, prompts_per_step=PROMPTS,
                         sampling=SAMPLING, filters=FilterConfig(dynamic_sampling=False), updates_per_batch=K,
                         micro_size=2)


CTX = SimpleNamespace(seed=0, tokenizer=SimpleNamespace(pad_token_id=IDS["pad_token_id"]))


@pytest.mark.parametrize("learners,zero,jitter", [(1, 0, 0.0), (2, 0, 0.0), (2, 3, 0.0), (1, 0, 0.5)],
                         ids=["1rank", "2ranks", "2ranks-zero3", "1rank-router-jitter"])
def test_k1_runs_no_old_logprob_pass_and_logs_the_same_mismatch(ray_local, learners, zero, jitter):
    model = ModelConfig(preset="tiny-hybrid", overrides={**LAYERS, "router_jitter_noise": jitter})
    group = LearnerGroup(ClusterConfig(learners=learners, cpus_per_learner=0.5), model, None, token_ids=IDS, seed=3)
    try:
        group.configure(OptimConfig(lr=5e-2), ScheduleConfig(kind="constant"), LearnerConfig(zero_stage=zero), 10)
        xs = samples()
        micro = len(xs) // (2 * learners)  # micro-batches of 2 per rank (micro_size 2)
        for step, K in enumerate([1, 2]):
            want = explicit_mismatch(group, xs)
            group.call_rank0(count_forwards)
            got = learn(CTX, stage(K), group, None, xs, OBJECTIVE, step)
            n = group.call_rank0(forwards)
            after = explicit_mismatch(group, xs)
            for k, v in want.items():
                assert math.isfinite(v) and abs(got[k] - v) <= TOL * max(1.0, abs(v)), (K, k, got[k], v)
            # the update moved the log-probs: metrics of the post-update weights would fail the check
            assert abs(after["mismatch/logp_abs_diff_mean"] - want["mismatch/logp_abs_diff_mean"]) > 50 * TOL
            assert got["updates"] == K and "old_logprobs" not in got
            # rank 0's objective forwards: its training forwards over its micro-batches, plus
            # K = 1 with a random train-mode forward: an eval pass each for the metrics;
            # K = 2: the no-grad old log-probs pass over every micro-batch of the step (rank 0's answer)
            train = micro
            extra = (micro if jitter else 0) if K == 1 else len(xs) // 2
            assert n == train + extra, (K, n, train, extra)
    finally:
        group.shutdown()


def test_gathered_outputs_join_rank_major_and_metrics_are_rank0s():
    a = {"loss": 1.0, "old_logprobs": [torch.tensor([1.0]), torch.tensor([2.0])]}
    b = {"loss": 1.0, "old_logprobs": [torch.tensor([3.0])]}
    out = join_rank_answers([a, b])
    assert out["loss"] == 1.0 and [float(t) for t in out["old_logprobs"]] == [1.0, 2.0, 3.0]
    assert [float(t) for t in a["old_logprobs"]] == [1.0, 2.0]  # rank 0's answer untouched
