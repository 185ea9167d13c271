"""Recipe errors stop before any work, naming the key path; overrides and did-you-mean."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError, load_recipe

BASE = """
name: t
model: {preset: tiny-hybrid}
stages:
  - name: sft
    kind: sft
    steps: 3
    data: {task: arithmetic}
    optim: {lr: 1.0e-3}
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def err(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    return str(e.value)


def test_valid_recipe_and_overrides(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE), ["stages.0.optim.lr=0.5", "stages.sft.steps=7", "seed=3"])
    assert cfg.stages[0].optim.lr == 0.5 and cfg.stages[0].steps == 7 and cfg.seed == 3
    assert cfg.stages[0].batch.global_size == 32  # default filled in
    cfg2 = load_recipe(write(tmp_path, BASE), ["stages[0].optim.betas=[0.9, 0.95]"])
    assert cfg2.stages[0].optim.betas == (0.9, 0.95)


def test_wrong_type_names_key_path(tmp_path):
    msg = err(tmp_path, BASE, ["stages.0.optim.lr=fast"])
    assert msg == 'stages[0].optim.lr: expected a number, got "fast"'


def test_unknown_key_suggests(tmp_path):
    msg = err(tmp_path, BASE.replace("lr: 1.0e-3", "lrr: 1.0e-3"))
    assert "stages[0].optim.lrr: unknown key" in msg and "did you mean 'lr'" in msg


def test_missing_required(tmp_path):
    msg = err(tmp_path, BASE.replace("    steps: 3\n", ""))
    assert msg == "stages[0].steps: required value missing"


def test_missing_file(tmp_path):
    msg = err(tmp_path, BASE.replace("data: {task: arithmetic}", "data: {train: /nope/train.jsonl}"))
    assert "stages[0].data.train: file not found: /nope/train.jsonl" in msg


def test_bad_kind_and_literal(tmp_path):
    assert "stages[0].kind: expected one of" in err(tmp_path, BASE.replace("kind: sft", "kind: sftt"))
    assert "model.dtype: expected one of" in err(tmp_path, BASE, ["model.dtype=fp8"])
    assert "stages[0].steps: expected an integer, got True" in err(tmp_path, BASE, ["stages.0.steps=true"])


def test_unknown_preset_and_task(tmp_path):
    assert "model.preset: unknown preset 'huge'" in err(tmp_path, BASE, ["model.preset=huge"])
    assert "stages[0].data.task: unknown task 'chess'" in err(tmp_path, BASE, ["stages.0.data.task=chess"])


def test_cli_exit_code_2_before_ray(tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a recipe with a config error")

    # Checked on the call itself, so it holds whatever Ray instance other tests started.
    monkeypatch.setattr("posttrain.cluster.start_ray", no_ray)
    path = write(tmp_path, BASE)
    assert main(["run", path, "stages.0.optim.lr=fast"]) == 2
    out = capsys.readouterr().out
    assert 'stages[0].optim.lr: expected a number, got "fast"' in out
    assert main(["validate", path]) == 0


def test_cli_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "--help"], capture_output=True, text=True).stdout
    for verb in ("run", "validate", "recipes"):
        assert verb in out


def test_shipped_recipes_validate():
    from posttrain.config import recipe_path

    for p in sorted(recipe_path("demo").parent.glob("*.yaml")):
        load_recipe(str(p))
