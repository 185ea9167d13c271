"""The code reward end to end: an rl stage on the synthetic coding task (small functions,
hidden tests) on a local Ray instance. A fresh tiny model writes no working program, so this
checks that the stage runs every completion through the reward, counts and logs, not that it
learns; tests/rollout/test_code_reward.py checks the scores and the sandbox."""
from __future__ import annotations

import json
import textwrap

import pytest

from posttrain.config import load_recipe
from posttrain.data import TASKS, load_records

RECIPE = """
name: code
seed: 0
model: {{preset: tiny-hybrid, overrides: {{num_hidden_layers: 2}}}}
cluster: {{num_cpus: 2}}
run_dir: {run_dir}
stages:
  - name: rl
    kind: rl
    steps: 3
    data: {{task: coding, task_args: {{n_train: 32, n_eval: 4}}, format: rl}}
    prompts_per_step: 2
    micro_size: 4
    sampling: {{n: 2, max_new_tokens: 16}}
    reward: {{fn: code, timeout_s: 10.0, num_workers: 2}}
    filters: {{dynamic_sampling: false}}
    eval: {{max_new_tokens: 16}}
"""


def test_coding_task_rows_pass_with_their_reference_solutions(tmp_path):
    from posttrain.rollout.rewards import code

    files = TASKS["coding"].write(tmp_path, n_train=12, n_eval=3, seed=1)
    rl = load_records(files["rl_train"], "rl").records
    sft = load_records(files["sft_train"], "prompt_completion").records
    assert [r.prompt for r in rl] == [r.prompt for r in sft]
    held = {r.prompt for r in load_records(files["rl_eval"], "rl").records}
    assert not held & {r.prompt for r in rl}
    for r, s in list(zip(rl, sft))[:4]:
        assert code(s.completion, r.answer) == 1.0  # the hidden tests hold for the reference
        assert code("def f(x):\n    return None\n", r.answer) == 0.0


@pytest.mark.slow
def test_rl_stage_on_the_coding_task_runs_counts_and_logs(tmp_path, ray_local):
    from posttrain.pipeline import run_recipe

    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(run_dir=tmp_path / "run")))
    summary = run_recipe(load_recipe(str(path)))
    assert summary["stages"][0]["name"] == "rl"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:  # every step scored its 2 x 2 completions and logged the reward's counters
        assert {"reward/mean", "reward/errors", "reward/timeouts"} <= set(r)
        assert r["reward/errors"] >= 0 and r["reward/timeouts"] == 0
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and all(r["n"] == 4 for r in evals)
