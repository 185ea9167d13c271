"""Asynchronous (one-step-off-policy) RL, `async_rollout` of an rl stage (docs/async_rl.md).

Load time: a staleness the loop cannot keep, async without an IS correction, and async colocated
on GPUs stop the recipe with their key path. Run time, on a local Ray instance with the rollout
worker in its own process: the one-step-off loop raises the sampled reward of a fresh tiny model
(as tests/posttrain/test_custom_loss_recipe.py's synchronous run does), never trains on a batch
staler than the bound, logs the staleness and the IS-correction statistics each step; with
max_staleness 0 it ends on bitwise the weights of the synchronous loop; killed mid-stage and
resumed it ends on bitwise the weights of an uninterrupted async run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.config import ConfigError, load_recipe

RECIPE = """
name: async
seed: 0
model: {{preset: tiny-hybrid, overrides: {{num_hidden_layers: 2}}}}
cluster: {{num_cpus: 2{cluster}}}
run_dir: {run_dir}
stages:
  - name: rl
    kind: rl
    steps: {steps}
    data: {{task: arithmetic, format: rl, task_args: {{n_train: 64, n_eval: 16}}}}
    prompts_per_step: 8
    sampling: {{n: 8, temperature: 1.0, max_new_tokens: 3}}
    loss: {{kind: grpo}}
    filters: {{dynamic_sampling: false}}
    reward: {{fn: "async_recipe_reward:starts_with_digit"}}
    micro_size: 64
    optim: {{lr: 3.0e-3}}
    eval: {{every: 0, max_new_tokens: 3, limit: 8}}
    checkpoint: {{every: {every}}}
{extra}
"""
REWARD = "def starts_with_digit(text, reference='', **meta):\n    return float(text[:1].isdigit())\n"
TIS = "    correction: {mode: tis, high: 2.0}\n"


def write(tmp_path: Path, name: str, *, steps: int = 12, every: int = 4, extra: str = "", cluster: str = "") -> Path:
    (tmp_path / "async_recipe_reward.py").write_text(REWARD)
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(RECIPE.format(run_dir=tmp_path / name, steps=steps, every=every, extra=extra,
                                               cluster=cluster)))
    return p


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "stages" / "00-rl" / "final" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def importable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("extra,cluster,error", [
    ("    async_rollout: {max_staleness: 2}\n" + TIS, "", r"stages\[0\]\.async_rollout\.max_staleness: must be 0 or 1"),
    ("    async_rollout: {max_staleness: 1}\n", "", r"stages\[0\]\.correction: async_rollout trains on samples"),
    ("    async_rollout: {}\n" + TIS, ", use_gpus: true, placement: colocated",
     r"stages\[0\]\.async_rollout: needs cluster\.placement split on GPUs"),
])
def test_async_settings_the_loop_cannot_honour_stop_the_recipe(tmp_path, importable, extra, cluster, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(str(write(tmp_path, "bad", extra=extra, cluster=cluster)))


def test_max_staleness_0_needs_no_correction_and_split_on_cpu_loads(tmp_path, importable):
    cfg = load_recipe(str(write(tmp_path, "ok", extra="    async_rollout: {max_staleness: 0}\n")))
    assert cfg.stages[0].async_rollout.max_staleness == 0
    cfg = load_recipe(str(write(tmp_path, "ok2", extra="    async_rollout: {}\n" + TIS, cluster=", placement: split")))
    assert cfg.stages[0].async_rollout.max_staleness == 1


def test_which_steps_are_generated_ahead_and_the_colocated_gpu_fallback(tmp_path, importable):
    from types import SimpleNamespace

    from rich.console import Console

    from posttrain.stages.rl import generate_ahead, steps_ahead

    cfg = load_recipe(str(write(tmp_path, "ok", steps=7, every=3, extra="    async_rollout: {}\n" + TIS))).stages[0]
    assert [s for s in range(8) if generate_ahead(cfg, s)] == [1, 2, 4, 5]  # never 0, 3, 6 (checkpoints), 7 (the end)
    console = Console(record=True, width=200)
    ctx = lambda p: SimpleNamespace(placement=p, console=console)  # noqa: E731
    assert steps_ahead(ctx(None), cfg) == 1
    assert steps_ahead(ctx(SimpleNamespace(gpus=False, mode="colocated")), cfg) == 1  # CPU: workers are processes
    assert steps_ahead(ctx(SimpleNamespace(gpus=True, mode="split")), cfg) == 1
    assert steps_ahead(ctx(SimpleNamespace(gpus=True, mode="colocated")), cfg) == 0
    assert "running without overlap" in console.export_text()


@pytest.mark.slow
def test_one_step_off_raises_the_reward_within_the_staleness_bound(tmp_path, importable, ray_local):
    from posttrain.pipeline import run_recipe

    summary = run_recipe(load_recipe(str(write(tmp_path, "run", extra="    async_rollout: {max_staleness: 1}\n" + TIS))))
    train = train_rows(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 13))
    # steps 1, 5 and 9 (the first, and the first after each checkpoint of every 4) are generated
    # from their own weights; every other one during the step before it, one version old
    ahead = [r["async/generated_ahead"] for r in train]
    assert ahead == [0.0 if s % 4 == 0 else 1.0 for s in range(12)], ahead
    assert [r["staleness"] for r in train] == ahead
    assert max(r["staleness"] for r in train) <= 1
    # the version the workers hold after each step: the step's own weights when they sample the
    # next batch during it, else the updated ones
    assert [r["policy_version"] for r in train] == [float(s + 1 if (s + 1) % 4 == 0 else s) for s in range(12)]
    for r in train:  # the IS correction's statistics and the engine-vs-learner ratio, every step
        assert {"is_ratio_mean", "is_weight_mean", "is_clip_frac", "mismatch/is_ratio_min",
                "mismatch/is_ratio_max", "mismatch/kl_k3", "time/wait_rollout", "sampled_tokens"} <= set(r), set(r)
    stale = [r for r in train if r["staleness"] == 1]
    fresh = [r for r in train if r["staleness"] == 0]
    # one update apart, the ratio leaves 1; with the same weights it is the engine's mismatch only
    assert max(abs(r["mismatch/logp_abs_diff_mean"]) for r in fresh) < 1e-3
    assert max(r["mismatch/logp_abs_diff_mean"] for r in stale) > 1e-3
    rewards = [r["reward/mean"] for r in train]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > max(0.5, 2 * first), rewards
    tp = summary["stages"][0]["throughput"]
    assert tp["sampled_trained_tokens_per_s"] > tp["sampled_tokens_per_s"] > 0


@pytest.mark.slow
def test_max_staleness_0_ends_on_the_synchronous_loops_weights(tmp_path, importable, ray_local):
    from posttrain.pipeline import run_recipe

    run_recipe(load_recipe(str(write(tmp_path, "sync", steps=4))))
    run_recipe(load_recipe(str(write(tmp_path, "zero", steps=4, extra="    async_rollout: {max_staleness: 0}\n"))))
    assert max_diff(final_weights(tmp_path / "sync"), final_weights(tmp_path / "zero")) == 0.0
    a, b = train_rows(tmp_path / "sync"), train_rows(tmp_path / "zero")
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]
    assert [r["staleness"] for r in b] == [0.0] * 4


def _cli(recipe: Path, *flags: str, kill_at: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_KILL_AT"}
    env["PYTHONPATH"] = os.pathsep.join([str(recipe.parent), env.get("PYTHONPATH", "")])
    if kill_at:
        env["POSTTRAIN_KILL_AT"] = kill_at
    p = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), *flags], env=env,
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=900)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out


@pytest.mark.slow
def test_async_run_killed_mid_stage_resumes_to_identical_weights(tmp_path):
    """Killed after step 3 with step 4's batch in flight (generated from step 3's weights);
    the newest state is step 2's, whose next batch both runs generate from step 2's weights."""
    extra = "    async_rollout: {max_staleness: 1}\n" + TIS
    straight = write(tmp_path, "straight", steps=6, every=2, extra=extra)
    rc, out = _cli(straight)
    assert rc == 0, out[-3000:]
    broken = write(tmp_path, "broken", steps=6, every=2, extra=extra)
    rc, out = _cli(broken, kill_at="step:rl:3")
    assert rc == -signal.SIGKILL, out[-3000:]
    rc, out = _cli(broken, "--resume")
    assert rc == 0, out[-3000:]
    assert "rl: resuming from step 2" in out
    assert max_diff(final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")) == 0.0
    a, b = train_rows(tmp_path / "straight"), train_rows(tmp_path / "broken")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]
    assert [r["staleness"] for r in b] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
