"""End to end on a local Ray instance: the SFT stage learns, outputs are complete, and a run
killed mid-stage resumes to the same weights as an uninterrupted one."""
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
import torch
from safetensors.torch import load_file

RECIPE = """
name: t
seed: 0
model: {{preset: tiny-hybrid}}
cluster: {{num_cpus: 2}}
run_dir: {run_dir}
stages:
  - name: sft
    kind: sft
    steps: {steps}
    data: {{task: arithmetic, task_args: {{n_train: 6000, n_eval: 300, min_digits: 1, max_digits: 2}}, max_seq_len: 48}}
    optim: {{lr: 3.0e-3, betas: [0.9, 0.95]}}
    schedule: {{kind: cosine, warmup_steps: 10}}
    batch: {{global_size: 64, micro_size: 32}}
    # eval.also on the stage's own task: its rl_eval rows are the sft_eval problems, so the extra
    # eval must report exactly the stage's accuracy (same weights, rows, greedy decoding)
    eval: {{every: 0, max_new_tokens: 6,
            also: [{{task: arithmetic, task_args: {{n_train: 6000, n_eval: 300, min_digits: 1, max_digits: 2}}}}]}}
    checkpoint: {{every: {every}}}
"""


def write_recipe(tmp: Path, run_dir: Path, steps: int, every: int) -> Path:
    p = tmp / f"r-{run_dir.name}.yaml"
    p.write_text(textwrap.dedent(RECIPE.format(run_dir=run_dir, steps=steps, every=every)))
    return p


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sft_learns_and_writes_outputs(tmp_path):
    run_dir = tmp_path / "run"
    began = time.perf_counter()
    proc = cli("run", str(write_recipe(tmp_path, run_dir, steps=300, every=0)))
    out, _ = proc.communicate(timeout=900)
    wall = time.perf_counter() - began
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft"]
    # the stage's wall time holds its steps plus the learner's start and two evals, within the run's
    speed = summary["stages"][0]["throughput"]
    assert 0 < speed["seconds"] < speed["stage_seconds"] < wall, (speed, wall)
    assert f"{speed['seconds']:.1f} s in training steps of {speed['stage_seconds']:.1f} s in the stage" in out
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 300
    assert before["accuracy"] <= 0.02
    # 1-2 digit +/-: exact match of a random model is ~0; the demo's SFT (64 x 300 steps of
    # a 400-step schedule) measured 5.3% on these 300 held-out problems, and the held-out loss
    # has fallen by more than 40%.
    assert after["accuracy"] >= 0.03, after
    assert after["loss"] < 0.6 * before["loss"]
    assert summary["stages"][0]["eval"]["accuracy"] == after["accuracy"]
    assert before["also"]["arithmetic"] == {"accuracy": before["accuracy"], "n": 300}
    # the change since step 0, paired row by row: the same for the stage's eval and its also-eval
    # of the same rows, and beyond noise (from ~0 to >= 3% of 300 rows)
    gain = summary["stages"][0]["eval"]["gain"]
    assert after["also"]["arithmetic"] == {"accuracy": after["accuracy"], "n": 300, "gain": gain} and after["gain"] == gain
    assert (gain["start"], gain["end"], gain["n"]) == (before["accuracy"], after["accuracy"], 300)
    assert gain["delta"] == pytest.approx(after["accuracy"] - before["accuracy"]) and gain["z"] > 2, gain
    assert f"sft: held-out accuracy {gain['start']:.3f} -> {gain['end']:.3f} ({gain['delta']:+.3f}, paired SE" in out
    assert summary["stages"][0]["eval"]["also"]["arithmetic"]["accuracy"] == after["accuracy"]
    final = run_dir / "stages" / "00-sft" / "final"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers loads it
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "minimax" and len(tok) == model.config.vocab_size
    assert list((run_dir / "plots").glob("sft_*.png"))
    assert list((run_dir / "tensorboard").iterdir())
    assert "sft" in out and "accuracy" in out  # the per-stage table


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    steps, every = 40, 4
    straight = tmp_path / "straight"
    p = cli("run", str(write_recipe(tmp_path, straight, steps, every)))
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]

    broken = tmp_path / "broken"
    recipe = write_recipe(tmp_path, broken, steps, every)
    p = cli("run", str(recipe))
    state_root = broken / "stages" / "00-sft" / "state"
    deadline = time.time() + 600
    while not any((d / "progress.json").exists() for d in state_root.glob("step-*")):
        assert p.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and everything it started
    p.wait()
    assert not (broken / "stages" / "00-sft" / "manifest.json").exists(), "killed too late to test resume"

    p = cli("run", str(recipe), "--resume")
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    assert "resuming from step" in out
    a = load_file(str(straight / "stages" / "00-sft" / "final" / "model.safetensors"))
    b = load_file(str(broken / "stages" / "00-sft" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"resumed weights differ by up to {worst}"
    steps_logged = [json.loads(x)["step"] for x in (broken / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["split"] == "train"]
    assert steps_logged == sorted(set(steps_logged)) == list(range(1, steps + 1))
    # a finished run resumes to a no-op
    p = cli("run", str(recipe), "--resume")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0 and "already complete" in out


def test_learners_are_kept_only_for_a_stage_that_starts_from_their_weights():
    """cluster.reuse_learners keeps the learners for the next stage only when it starts from the
    stage they just ran, with the same model overrides and no LoRA on either side (a LoRA
    stage's checkpoint is a base plus an adapter, not the learners' view)."""
    from types import SimpleNamespace

    from posttrain.pipeline import continues

    def st(name, lora=None, overrides=None):
        return SimpleNamespace(name=name, lora=lora, model_overrides=overrides or {})

    a = st("a")
    assert continues(a, st("b"), "a")
    assert not continues(a, st("b"), "sft")  # init_from another stage
    assert not continues(a, st("b", lora=object()), "a")
    assert not continues(st("a", lora=object()), st("b"), "a")
    assert not continues(a, st("b", overrides={"gradient_checkpointing": True}), "a")



def test_summary_table_shows_each_stages_gain_and_its_z():
    """The run's closing table has an `acc gain (z)` column (exact match) when a stage measured one: delta since the
    stage's start and z of the paired difference; '-' for a stage without (no step-0 eval of the
    same rows) and for z when nothing varied."""
    from rich.console import Console

    from posttrain.evals import paired_gain
    from posttrain.pipeline import summary_table

    g = paired_gain([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1, 1, 1])
    flat = paired_gain([1, 0], [1, 0])
    summary = {"recipe": "t", "stages": [
        {"name": "sft", "kind": "sft", "eval": {"accuracy": 0.9, "n": 10, "gain": g}},
        {"name": "dpo", "kind": "dpo", "eval": {"accuracy": 0.9, "n": 10}},
        {"name": "rl", "kind": "rl", "eval": {"accuracy": 0.5, "n": 2, "gain": flat}}]}
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    lines = console.export_text().splitlines()
    header = next(ln for ln in lines if "┃ stage" in ln)
    assert "acc gain (z)" in header
    row = {ln.split()[1]: ln for ln in lines if ln.split()[1:2] in (["sft"], ["dpo"], ["rl"])}
    assert "+0.300 (2.0)" in row["sft"] and "+0.000 (-)" in row["rl"]
    assert "(" not in row["dpo"]
    # no stage with a gain: no column
    for st in summary["stages"]:
        st["eval"].pop("gain", None)
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    assert "gain" not in console.export_text()


def test_closing_tables_fit_80_columns_with_every_column_a_gpu_chain_fills():
    """A GPU chain fills every column (DPO's preference accuracies, RL's mean@k gain, tok/s, GPU
    memory); a device or CI log is 80 columns wide, where rich would cut the cells to '…'. Drawn
    on a wide console, each table must still be at most 80 characters wide, and show its numbers."""
    from rich.console import Console

    from posttrain.evals import paired_gain
    from posttrain.pipeline import summary_table, training_table

    g = paired_gain([0, 1, 0, 1, 0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1, 1, 1, 0, 1])
    speed = {"tokens_per_s": 11239.0, "gpu_peak_gib": 43.6, "stage_seconds": 221.9}
    summary = {"recipe": "gpu", "stages": [
        {"name": "long_sft", "kind": "sft", "params": {"trainable_share": 1.0}, "throughput": speed,
         "eval": {"accuracy": 0.521, "n": 144, "loss": 0.61, "gain": g}},
        {"name": "dpo", "kind": "dpo", "params": {"trainable_share": 0.0123}, "throughput": speed,
         "eval": {"accuracy": 0.753, "n": 288, "pref_accuracy": 0.976, "pref_pairs": 82, "logp_accuracy": 0.99,
                  "gain": g, "pref_gain": g}},
        {"name": "cispo", "kind": "rl", "params": {"trainable_share": 1.0}, "throughput": speed,
         "eval": {"accuracy": 0.778, "n": 288, "gain": g, "sampled": {"accuracy": 0.724}, "sampled_gain": g}}]}
    for table in (summary_table(summary), training_table(summary)):
        console = Console(width=200, record=True)
        console.print(table)
        text = console.export_text()
        assert "…" not in text
        assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    console = Console(width=200, record=True)
    console.print(summary_table(summary), training_table(summary))
    text = console.export_text()
    for cell in ("+0.300 (2.0)", "0.976", "long_sft", "1.23%", "11239", "43.6", "221.9", "mean@k gain (z)"):
        assert cell in text, cell
