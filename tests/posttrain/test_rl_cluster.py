"""Rollout workers on a local Ray instance: 2 RolloutWorker actors + 1 learner. Weight sync makes
a worker's log-probs equal the learner's and bumps the version; prompts are sharded and merged
in order; a killed worker is replaced and brought to the current weights and version. Every test
runs with the object-store sync and with the process-group broadcast (gloo here; NCCL on GPUs,
the split placement's path), whose group is rebuilt when a worker is replaced."""
from __future__ import annotations

import pytest
import torch
from rich.console import Console

from posttrain.cluster import LearnerGroup, RolloutGroup, RolloutWorkerLost
from posttrain.config import ClusterConfig, LearnerConfig, ModelConfig, OptimConfig, ScheduleConfig
from posttrain.objectives import GRPOLoss, PolicyObjective, SFTObjective, StepCounts
from posttrain.rollout import RolloutConfig, SamplingConfig, SamplingParams
from posttrain.stages.rl import Sample, generate_with_recovery, to_rl_batch
from posttrain.weight_sync import BroadcastWeightSync, ObjectStoreWeightSync

IDS = dict(vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODEL = ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2})
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
# log-probs at temperature 1, as the rl stage computes them on the learner
recompute_logprobs = PolicyObjective(GRPOLoss(), SamplingConfig(temperature=1.0)).logprobs


@pytest.fixture(scope="module", params=["object_store", "broadcast"])
def group(ray_local, request):
    cluster = ClusterConfig(num_cpus=2, learners=1, rollout_workers=2)
    learners = LearnerGroup(cluster, MODEL, None, token_ids=IDS, seed=0)
    learners.configure(OptimConfig(lr=5e-2), ScheduleConfig(kind="constant"), LearnerConfig(), 10)
    # workers build the preset from an unseeded RNG: other weights than the learner until a push
    rollouts = RolloutGroup(cluster, RolloutConfig(engine="native", max_slots=8), MODEL, None, token_ids=IDS)
    kind = {"object_store": ObjectStoreWeightSync, "broadcast": BroadcastWeightSync}[request.param]
    sync = kind(learners, rollouts, bucket_mb=0.25)  # small buckets: many of them
    yield learners, rollouts, sync
    rollouts.shutdown()
    learners.shutdown()


def probe_batch():
    samples = [Sample(p, c, 0.0, 0.0) for p, c in zip(PROMPTS, _fixed_completions())]
    return to_rl_batch(samples, 0, mask_truncated=False)


def _fixed_completions():
    from posttrain.rollout import Completion

    return [Completion(i, 0, [20 + i, 21, 22, 2], [0.0] * 4, "stop") for i in range(len(PROMPTS))]


def max_diff_worker_vs_learner(learners, rollouts, index: int) -> float:
    b = probe_batch()
    [lrn] = learners.call_rank0(recompute_logprobs, [b])
    [wrk] = rollouts.call(index, recompute_logprobs, [b])
    return float((lrn - wrk).abs().max())


def sgd_step(learners):
    """One real optimizer step so the learner's weights move away from what workers hold."""
    b = probe_batch().model_batch
    learners.train_step(SFTObjective(), [[b]], StepCounts(tokens=b.n_targets))


def test_sync_makes_worker_logprobs_equal_learner(group):
    learners, rollouts, sync = group
    # The workers were built with torch's default seed, not the learner's: they differ.
    assert max_diff_worker_vs_learner(learners, rollouts, 0) > 1e-3
    sync.push(0)
    for i in range(len(rollouts)):
        assert max_diff_worker_vs_learner(learners, rollouts, i) <= 1e-5
    sgd_step(learners)
    assert max_diff_worker_vs_learner(learners, rollouts, 1) > 1e-5
    metrics = sync.push(1)
    assert metrics["sync/buckets"] > 1
    assert rollouts.policy_versions() == [1, 1]
    for i in range(len(rollouts)):
        assert max_diff_worker_vs_learner(learners, rollouts, i) <= 1e-5
    with pytest.raises(ValueError, match="older"):
        sync.push(0)


def test_sharded_generation_is_prompt_major_and_versioned(group):
    learners, rollouts, sync = group
    sync.push(sync.version + 1)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, stop_token_ids=(2,), seed=7)
    batch = rollouts.generate(PROMPTS, params)
    assert batch.policy_version == sync.version
    assert [(c.prompt_index, c.sample_index) for c in batch.completions] == [(p, s) for p in range(4) for s in range(3)]
    again = rollouts.generate(PROMPTS, params)  # same seed, same shards: same samples
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in batch.completions]
    # The engine's log-probs of its own samples are the learner's (token-in/token-out).
    samples = [Sample(PROMPTS[c.prompt_index], c, 0.0, 0.0) for c in batch.completions]
    b = to_rl_batch(samples, 0, mask_truncated=False)
    [lrn] = learners.call_rank0(recompute_logprobs, [b])
    assert torch.allclose(lrn, b.rollout_logprobs, atol=1e-4)
    assert batch.metrics["rollout/stop_frac"] + batch.metrics["rollout/length_frac"] == pytest.approx(1.0)


def test_killed_worker_is_replaced_with_current_weights(group, ray_local):
    learners, rollouts, sync = group
    sgd_step(learners)
    sync.push(sync.version + 1)
    version = sync.version
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, stop_token_ids=(2,), seed=3)
    before = rollouts.generate(PROMPTS, params)
    ray_local.kill(rollouts.actors[1])
    with pytest.raises(RolloutWorkerLost) as lost:
        rollouts.generate(PROMPTS, params)
    assert lost.value.replaced == [1]
    assert rollouts.policy_versions() == [version, 0]  # rebuilt from the init weights
    sync.push(version, workers=[1])
    assert max_diff_worker_vs_learner(learners, rollouts, 1) <= 1e-5
    # What the stage does: kill again, recover inside generate_with_recovery, same samples.
    ray_local.kill(rollouts.actors[0])
    after = generate_with_recovery(rollouts, sync, PROMPTS, params, Console(quiet=True))
    assert after.policy_version == version
    assert [c.token_ids for c in after.completions] == [c.token_ids for c in before.completions]
