"""The dpo stage end to end on a local Ray instance: pairs sampled from the policy, a run
killed mid-stage resumes without regenerating pairs or reference log-probs. DPO's quality on
the demo task (preference accuracy up, exact match kept) is checked on the demo run itself:
tests/posttrain/test_demo_recipe.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

TASK = "{task: arithmetic, task_args: {n_train: 2000, n_eval: 100, max_digits: 2}"

RESUME_RECIPE = f"""
name: t
seed: 0
model: {{preset: tiny-hybrid}}
cluster: {{num_cpus: 2}}
run_dir: {{run_dir}}
stages:
  - name: dpo
    kind: dpo
    steps: 8
    data: {TASK}, format: rl, max_seq_len: 40}}
    pairs: {{source: policy, sampling: {{n: 4, max_new_tokens: 6}}, num_prompts: 48, eval_fraction: 0.25,
            reward: {{fn: "dpo_test_reward:by_length"}}}}
    loss: {{kind: sigmoid, beta: 0.1, rpo_alpha: 0.2}}
    optim: {{lr: 1.0e-3}}
    batch: {{global_size: 8, micro_size: 4}}
    eval: {{every: 0, max_new_tokens: 4, limit: 16}}
    checkpoint: {{every: 2}}
"""

# A random model never answers an arithmetic prompt right; scoring by length still makes pairs.
REWARD_MODULE = "def by_length(text, reference, **meta):\n    return float(len(text))\n"


def cli(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", *args], start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_dpo_run_resumes_without_regenerating(tmp_path):
    (tmp_path / "dpo_test_reward.py").write_text(REWARD_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(RESUME_RECIPE.replace("{run_dir}", str(run_dir))))
    stage = run_dir / "stages" / "00-dpo"
    p = cli("run", str(recipe), env=env)
    deadline = time.time() + 600
    while not any((d / "progress.json").exists() for d in (stage / "state").glob("step-*")):
        if p.poll() is not None:
            pytest.fail("run ended before its first checkpoint:\n" + p.stdout.read()[-3000:])
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (stage / "manifest.json").exists(), "killed too late to test resume"
    files = [stage / "pairs" / n for n in ("train.jsonl", "eval.jsonl", "info.json", "ref_logps.json")]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    info = json.loads((stage / "pairs" / "info.json").read_text())
    assert info["prompts"] == 48 and info["pairs"] >= 16

    p = cli("run", str(recipe), "--resume", env=env)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "reusing generated pairs" in out and "reusing reference log-probs" in out
    assert "resuming from step" in out and "sampling" not in out
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == list(range(1, 9)), train_steps  # every step logged exactly once
    assert [r["split"] for r in rows].count("pairs") == 1
    manifest = json.loads((stage / "manifest.json").read_text())
    for key in ("accuracy", "pref_accuracy", "logp_accuracy", "reward_margin"):
        assert key in manifest["eval"], key
    assert list((run_dir / "plots").glob("dpo_*.png"))
