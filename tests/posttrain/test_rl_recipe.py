"""The demo recipe end to end (fixed seed): SFT, then GRPO, then CISPO, each raising held-out
exact-match accuracy above the previous stage's; every RL step logs what the issue asks for."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

RL_KEYS = {
    "reward/mean", "reward/std", "accuracy", "response_length", "clip_frac", "entropy",
    "mismatch/logp_abs_diff_mean", "mismatch/prob_pearson", "mismatch/is_ratio_min", "mismatch/is_ratio_max",
    "time/generate", "time/reward", "time/learner", "time/sync", "policy_version", "reward/errors",
}


@pytest.mark.recipe
def test_demo_grpo_and_cispo_each_raise_accuracy(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", "demo", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = {s["name"]: s["eval"]["accuracy"] for s in summary["stages"]}
    assert [n for n in acc if n in ("sft", "grpo", "cispo")] == ["sft", "grpo", "cispo"]
    assert acc["sft"] < acc["grpo"] < acc["cispo"], acc
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stage in ("grpo", "cispo"):
        train = [r for r in rows if r["stage"] == stage and r["split"] == "train"]
        assert train and RL_KEYS <= set(train[-1]), RL_KEYS - set(train[-1])
        assert train[-1]["policy_version"] == len(train)  # one sync per step, versions 1..steps
        assert 0.9 < train[-1]["mismatch/prob_pearson"] <= 1.0
