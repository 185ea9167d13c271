"""recipes/long_context.yaml (the demo's short SFT stage, then long-context SFT; fixed seed): the long stage raises needle
retrieval accuracy over its starting point (the short SFT checkpoint) and reports it per
(length, depth) cell in summary.json, with a heatmap in <run_dir>/plots/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.config import recipe_path


@pytest.mark.slow
def test_demo_long_context_stage_raises_retrieval_accuracy(tmp_path):
    raw = yaml.safe_load(recipe_path("long_context").read_text())
    demo = yaml.safe_load(recipe_path("demo").read_text())
    assert [s["name"] for s in raw["stages"]] == ["sft", "long_sft"]
    assert raw["stages"][0] == demo["stages"][0]  # starts from the demo's short SFT stage
    run_dir = tmp_path / "run"
    raw["run_dir"] = str(run_dir)
    recipe = tmp_path / "demo-long.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["stage"] == "long_sft" and r["split"] == "eval"]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == raw["stages"][1]["steps"]
    assert after["accuracy"] >= before["accuracy"] + 0.15, (before["accuracy"], after["accuracy"])
    assert after["loss"] < before["loss"]

    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["stages"][1]["eval"]
    assert final["accuracy"] == after["accuracy"]
    cells = final["needle"]["cells"]
    task = raw["stages"][1]["data"]["task_args"]
    lengths = task.get("eval_lengths", task["lengths"])
    assert {(c["length"], c["depth"]) for c in cells} == {(L, float(d)) for L in lengths for d in task["depths"]}
    assert sum(c["n"] for c in cells) == final["n"]
    assert abs(sum(c["accuracy"] * c["n"] for c in cells) / final["n"] - final["accuracy"]) < 1e-9
    assert Path(final["needle"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert final["needle"]["plot"].startswith(str(run_dir / "plots"))
