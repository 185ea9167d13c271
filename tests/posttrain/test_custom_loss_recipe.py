"""A user's own loss from a recipe: `loss: {kind: custom, fn: "module:function", args: ...}`.

Load time: a module that does not import, a missing function or a signature that does not fit
stops the recipe with the key path `stages[i].loss.fn` (exit code 2 from the CLI). Run time: the
shipped example (examples/custom_loss.py) trains a fresh model in a short rl stage from a recipe
(`posttrain run` in a subprocess, its own Ray), raising the sampled reward, with its metrics
logged like the built-in losses'.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """
name: custom
seed: 0
model: {{preset: tiny-hybrid}}
cluster: {{num_cpus: 2}}
run_dir: {run_dir}
stages:
  - name: rl
    kind: rl
    steps: {steps}
    data: {{task: arithmetic, format: rl, task_args: {{n_train: 64, n_eval: 16}}}}
    prompts_per_step: 8
    sampling: {{n: 8, temperature: 1.0, max_new_tokens: 3}}
    loss: {loss}
    filters: {{dynamic_sampling: false}}
    reward: {{fn: "custom_recipe_reward:starts_with_digit"}}
    micro_size: 64
    optim: {{lr: 3.0e-3}}
    eval: {{every: 0, max_new_tokens: 3, limit: 8}}
"""
REWARD = "def starts_with_digit(text, reference='', **meta):\n    return float(text[:1].isdigit())\n"


def write(tmp_path: Path, loss: str, steps: int = 12) -> Path:
    (tmp_path / "custom_recipe_reward.py").write_text(REWARD)
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(RECIPE.format(run_dir=tmp_path / "run", steps=steps, loss=loss)))
    return p


@pytest.fixture
def importable(tmp_path, monkeypatch):
    """The example's folder and the reward's on sys.path, as PYTHONPATH would put them."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("loss,error", [
    ('{kind: custom, fn: "no_such_module_xyz:f"}', r"stages\[0\]\.loss\.fn: cannot import module 'no_such_module_xyz'"),
    ('{kind: custom, fn: "custom_loss:nope"}', r"stages\[0\]\.loss\.fn: module 'custom_loss' has no callable 'nope'"),
    ('{kind: custom, fn: "custom_loss:clipped_reinforce", args: {clipp: 0.3}}',
     r"stages\[0\]\.loss\.fn: .*'clipp'"),
    ('{kind: custom, fn: "posttrain.algorithms:dpo_loss"}', r"stages\[0\]\.loss\.fn: "),
    ('{kind: custom, fn: "custom_loss:clipped_reinforce", eps_high: 1}', r"stages\[0\]\.loss\.eps_high: unknown key"),
])
def test_a_loss_that_does_not_fit_stops_the_recipe_at_load_time(tmp_path, importable, loss, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(str(write(tmp_path, loss)))


def test_cli_exits_2_naming_the_loss_fn(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate",
                          str(write(tmp_path, '{kind: custom, fn: "no_such_module_xyz:f"}'))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "stages[0].loss.fn: cannot import module" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_the_shipped_example_loss_trains_in_an_rl_stage_from_a_recipe(tmp_path):
    recipe = write(tmp_path, '{kind: custom, fn: "custom_loss:clipped_reinforce", args: {clip: 0.3}}')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(tmp_path),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 12
    assert {"clip_frac", "weight_mean", "loss", "grad_norm"} <= set(train[0])  # the loss's own metrics, logged
    rewards = [r["reward/mean"] for r in train]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > max(0.5, 2 * first), rewards
