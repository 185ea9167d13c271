"""`posttrain compare`: each stage's held-out change across run dirs, read from metrics.jsonl.
References: the paired gain a run logged (posttrain.evals.paired_gain) is taken as is; for a
run without one, the unpaired SE of two accuracies, computed here by hand."""
from __future__ import annotations

import json
import math

import pytest

from posttrain.cli import main
from posttrain.compare import stage_changes
from posttrain.evals import paired_gain


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return run_dir


def eval_row(stage, step, accuracy, n, **extra):
    return {"stage": stage, "split": "eval", "step": step, "accuracy": accuracy, "n": n, **extra}


GAIN = paired_gain([0] * 6 + [1] * 4, [1] * 4 + [0] * 2 + [1] * 4)  # 0.4 -> 0.8 over 10 rows: z 2.45


def runs(tmp_path):
    a = write_run(tmp_path / "seed0" / "gpu", [
        eval_row("sft", 0, 0.4, 10), {"stage": "sft", "split": "train", "step": 1, "loss": 1.0},
        eval_row("sft", 5, 0.55, 10), eval_row("sft", 10, 0.8, 10, gain=GAIN),
        eval_row("rl", 0, 0.4, 50), eval_row("rl", 8, 0.5, 50),
        eval_row("dpo", 0, 0.3, 20)])  # a stage cut before its last eval: no change yet
    b = write_run(tmp_path / "seed1" / "gpu", [eval_row("sft", 0, 0.5, 100), eval_row("sft", 10, 0.2, 100),
                                               eval_row("rl", 0, 0.5, 50), eval_row("rl", 8, 0.5, 50)])
    return a, b


def test_stage_changes_paired_where_logged_else_unpaired(tmp_path):
    a, b = runs(tmp_path)
    sft, rl = stage_changes(a)
    assert (sft.stage, sft.paired, sft.start, sft.end, sft.delta, sft.se, sft.z) == (
        "sft", True, 0.4, 0.8, GAIN["delta"], GAIN["se"], GAIN["z"])
    assert rl.stage == "rl" and not rl.paired and rl.n == 50
    se = math.sqrt(0.4 * 0.6 / 50 + 0.5 * 0.5 / 50)
    assert rl.delta == pytest.approx(0.1) and rl.se == pytest.approx(se) and rl.z == pytest.approx(0.1 / se)
    sft_b, rl_b = stage_changes(b)
    assert sft_b.delta == pytest.approx(-0.3) and sft_b.z < -2
    assert rl_b.delta == 0.0 and rl_b.z == 0.0


def test_compare_prints_a_table_and_draws_it(tmp_path, capsys):
    a, b = runs(tmp_path)
    png = tmp_path / "out" / "cmp.png"
    assert main(["compare", str(a), str(b), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the runs share a dir name: labelled by the shortest tails that differ
    assert "seed0/gpu" in out and "seed1/gpu" in out
    assert f"+0.400 ({GAIN['z']:.1f})" in out  # paired: no u
    z_b = -0.3 / math.sqrt(0.5 * 0.5 / 100 + 0.2 * 0.8 / 100)  # -4.7
    assert "+0.100 (1.0u)" in out and f"-0.300 ({z_b:.1f}u)" in out
    # sft: one run up beyond noise, one down; rl: neither
    assert "up 1 of 2, down 1" in out and "up 0 of 2" in out


def test_compare_names_the_file_it_cannot_read(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nowhere"), "--png", str(tmp_path / "x.png")]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and "nowhere/metrics.jsonl: not found" in out and "\n" not in out
    bad = write_run(tmp_path / "bad", [eval_row("sft", 0, 0.1, 10)])
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "split"\n')
    assert main(["compare", str(bad), "--png", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl line 3: not JSON" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_a_dpo_stage_with_a_paired_preference_gain_gets_its_own_column(tmp_path, capsys):
    pref = paired_gain([0.5] * 8, [1.0] * 6 + [0.5, 0.0])  # 0.5 -> 0.8125 over 8 pairs
    run = write_run(tmp_path / "r", [eval_row("dpo", 0, 0.3, 20, pref_accuracy=0.5),
                                     eval_row("dpo", 30, 0.35, 20, pref_accuracy=0.8125, pref_gain=pref)])
    dpo, dpo_pref = stage_changes(run)
    assert dpo.stage == "dpo" and not dpo.paired and dpo.delta == pytest.approx(0.05)
    assert (dpo_pref.stage, dpo_pref.paired, dpo_pref.start, dpo_pref.end, dpo_pref.z) == (
        "dpo (pref)", True, 0.5, 0.8125, pref["z"])
    assert main(["compare", str(run), "--png", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert "dpo (pref)" in out and f"+0.312 ({pref['z']:.1f})" in out
