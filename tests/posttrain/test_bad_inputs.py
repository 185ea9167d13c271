"""Bad input stops before any work: exit code 2, exactly one output line naming the key path (or
the file and row), no traceback, Ray never started, no run directory written, existing
directories untouched. One table row per class of mistake a new user makes (issue 17).

The CLI runs in-process (`posttrain.cli.main`) so the table stays fast; start_ray and
LearnerGroup are replaced by functions that fail the test if called. The terminal is 40
columns wide (rich wraps at the terminal width unless told not to). Two cases also run as a
real subprocess, where import-time warnings or a traceback would show.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import pytest

from posttrain.cli import main
from posttrain.testing import toy_transformer

RECIPE = """
name: t
model: {{preset: tiny-hybrid}}
run_dir: {run_dir}
stages:
  - name: sft
    kind: sft
    steps: 3
    data: {{train: {train}, format: prompt_completion}}
    batch: {{global_size: 4, micro_size: 2}}
  - name: rl
    kind: rl
    steps: 2
    data: {{train: {rl}, format: rl}}
    prompts_per_step: 2
    micro_size: 4
    sampling: {{n: 2, max_new_tokens: 4}}
    loss: {{kind: cispo}}
"""
GOOD_ROW = {"prompt": "1+1=", "completion": "2"}
RL_ROW = {"prompt": "1+1=", "answer": "2"}


@dataclass
class World:
    """A user's directory: good data files, a foreign directory and a plain file."""

    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def recipe(self, text: Union[str, bytes, None] = None, **fmt: str) -> str:
        p = self.root / "r.yaml"
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            values = dict(run_dir=str(self.run_dir), train=str(self.train), rl=str(self.root / "rl.jsonl"), **fmt)
            p.write_text(textwrap.dedent(RECIPE if text is None else text).format(**values))
        return str(p)

    def jsonl(self, name: str, rows: list, bad: dict[int, str] = {}) -> Path:  # noqa: B006 - read only
        """rows as JSON lines; bad[n] replaces line n (1-based) with raw text."""
        lines = [json.dumps(r) for r in rows]
        for n, text in bad.items():
            lines[n - 1] = text
        p = self.root / name
        p.write_text("\n".join(lines) + "\n")
        return p


@pytest.fixture
def world(tmp_path) -> World:
    w = World(tmp_path)
    w.jsonl("train.jsonl", [GOOD_ROW] * 8)
    w.jsonl("rl.jsonl", [RL_ROW] * 4)
    foreign = tmp_path / "mine"  # a user's directory that happens to hold a recipe.yaml
    foreign.mkdir()
    (foreign / "recipe.yaml").write_text("my notes, not a recipe\n")
    (foreign / "notes.txt").write_text("keep me\n")
    (tmp_path / "afile").write_text("a file, not a directory\n")
    (tmp_path / "emptymodel").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "minimax"}')
    (tmp_path / "emptytok").mkdir()
    toy_transformer(0).save_pretrained(tmp_path / "qwen")  # a Qwen2, not our hybrid
    (tmp_path / "badmod.py").write_text("1 / 0\n")
    (tmp_path / "exitmod.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "okmod.py").write_text("def other(text, ref, **meta):\n    return 0.0\n")
    return w


def _random_bytes(n: int = 4096) -> bytes:
    return random.Random(17).randbytes(n)


@dataclass
class Case:
    id: str
    expect: list[str]  # substrings of the one output line ({root} is the world's directory)
    overrides: list[str] = field(default_factory=list)
    setup: Callable[[World], str] = lambda w: w.recipe()  # writes files, returns the recipe argument
    verbs: tuple[str, ...] = ("validate", "run")
    flags: tuple[str, ...] = ()


LONG = "x" * 300  # one path component longer than any file system's 255-byte limit

CASES = [
    # --------------------------------------------------- the classes: tracebacks
    Case("recipe-not-utf8", ["error: {root}/r.yaml: not UTF-8 text (byte 0xff at offset 8)"],
         setup=lambda w: w.recipe(b"name: t\n\xff\xfe\x00stages: []\n")),
    Case("recipe-path-too-long", ["error: recipe /tmp/" + LONG + ".yaml: File name too long"],
         setup=lambda w: "/tmp/" + LONG + ".yaml"),
    Case("data-path-too-long", ["stages[0].data.train: File name too long: {root}/" + LONG],
         overrides=["stages.0.data.train={root}/" + LONG]),
    Case("run-dir-too-long", ["error: run_dir: File name too long: {root}/" + LONG], overrides=["run_dir={root}/" + LONG]),
    Case("data-random-bytes-jsonl", ["stages[0].data.train: {root}/train.jsonl:1: not UTF-8 text"],
         setup=lambda w: (w.train.write_bytes(_random_bytes()), w.recipe())[1]),
    Case("data-random-bytes-json", ["stages[0].data.train: {root}/train.json: not UTF-8 text"],
         overrides=["stages.0.data.train={root}/train.json"],
         setup=lambda w: ((w.root / "train.json").write_bytes(_random_bytes()), w.recipe())[1]),
    Case("data-random-bytes-parquet", ["stages[0].data.train: {root}/train.parquet: cannot read parquet"],
         overrides=["stages.0.data.train={root}/train.parquet"],
         setup=lambda w: ((w.root / "train.parquet").write_bytes(_random_bytes()), w.recipe())[1]),
    Case("address-scheme-misspelled", ["error: cluster.address: expected null, 'auto', host:port or ray://host:port",
                                       "got 'rey://head:10001'"], overrides=["cluster.address=rey://head:10001"]),
    Case("address-http-scheme", ["cluster.address: expected"], overrides=["cluster.address=http://head:6379"]),
    Case("run-dir-is-a-file", ["error: run_dir: {root}/afile is a file, not a directory"], overrides=["run_dir={root}/afile"]),
    # ------------------------------------------------- values accepted that cannot be right
    Case("lr-nan", ["error: stages[0].optim.lr: must be a positive finite number, got nan"],
         overrides=["stages.sft.optim.lr=.nan"]),
    Case("cispo-eps-high-negative", ["error: stages[1].loss.eps_high: must be a finite number > 0, got -1.0"],
         overrides=["stages.rl.loss.eps_high=-1"]),
    Case("profile-window-past-the-stage", ["error: stages[1].learner.profile: the window [3, 5] ends after the stage's "
                                           "4 optimizer steps"],
         overrides=["stages.rl.updates_per_batch=2", "stages.rl.learner.profile=[3,5]"]),
    Case("top-p-above-1", ["error: stages[1].sampling.top_p: must be in (0, 1], got 1.5"],
         overrides=["stages.rl.sampling.top_p=1.5"]),
    # ------------------------------------------------------------------ checked too late
    Case("reward-module-missing", ["error: stages[1].reward.fn: cannot import module 'no_such_mod_17'"],
         overrides=["stages.rl.reward.fn=no_such_mod_17:score"]),
    Case("reward-module-raises-on-import", ["stages[1].reward.fn: cannot import module 'badmod': ZeroDivisionError"],
         overrides=["stages.rl.reward.fn=badmod:score"]),
    Case("reward-function-missing", ["stages[1].reward.fn: module 'okmod' has no callable 'score'"],
         overrides=["stages.rl.reward.fn=okmod:score"]),
    Case("data-bad-row", ['error: stages[0].data.train: {root}/train.jsonl:3: key "completion" missing'],
         setup=lambda w: (w.jsonl("train.jsonl", [GOOD_ROW] * 5, {3: '{"prompt": "2+2="}'}), w.recipe())[1]),
    Case("data-bad-row-late-in-file", ["stages[0].data.train: {root}/train.jsonl:4000: invalid JSON"],
         setup=lambda w: (w.jsonl("train.jsonl", [GOOD_ROW] * 4001, {4000: '{"prompt": '}), w.recipe())[1]),
    Case("eval-bad-row", ['stages[0].data.eval: {root}/ev.jsonl:2: "completion": empty string'],
         overrides=["stages.sft.data.eval={root}/ev.jsonl"],
         setup=lambda w: (w.jsonl("ev.jsonl", [GOOD_ROW, {"prompt": "a", "completion": " "}]), w.recipe())[1]),
    Case("rl-bad-row", ['stages[1].data.train: {root}/rl.jsonl:2: "answer": expected a string, got int'],
         setup=lambda w: (w.jsonl("rl.jsonl", [RL_ROW, {"prompt": "q", "answer": 4}]), w.recipe())[1]),
    Case("mix-bad-row", ['stages[0].data.mix[0].train: {root}/mix.jsonl:1: key "prompt" missing'],
         overrides=["stages.sft.data.mix=[{train: {root}/mix.jsonl}]"],
         setup=lambda w: (w.jsonl("mix.jsonl", [{"completion": "x"}]), w.recipe())[1]),
    Case("skip-but-no-valid-row", ["stages[0].data.train: {root}/train.jsonl: no valid prompt_completion rows (2 bad rows"],
         overrides=["stages.sft.data.on_bad_row=skip"],
         setup=lambda w: (w.jsonl("train.jsonl", [{"prompt": "a"}] * 2), w.recipe())[1]),
    Case("model-dir-empty", ["error: model.path: {root}/emptymodel has no config.json"],
         overrides=["model={path: {root}/emptymodel}"]),
    Case("model-dir-missing", ["error: model.path: directory not found: {root}/nomodel"],
         overrides=["model={path: {root}/nomodel}"]),
    Case("native-engine-on-a-qwen2", ["error: stages[1].rollout.engine: 'native' needs a MiniMax hybrid model"],
         overrides=["model={path: {root}/qwen}", "stages.rl.rollout.engine=native"]),
    Case("cuda-graphs-required-of-transformers-minimax", [
        "error: stages[1].rollout.cuda_graphs: true, but transformers cannot compile this model whole"],
         overrides=["stages.rl.rollout={engine: hf, cuda_graphs: true}"]),
    Case("tokenizer-dir-empty", ["error: tokenizer.path: {root}/emptytok has no tokenizer.json"],
         overrides=["tokenizer={kind: path, path: {root}/emptytok}"]),
    Case("batch-not-dividing-learners", ["error: stages[0].batch.global_size: 4 must be a multiple of batch.micro_size x "
                                         "cluster.learners = 2 x 4 = 8"], overrides=["cluster.learners=4"]),
    # ------------------------------------------------------------ intent not respected
    Case("resume-missing-run-dir", ["error: run_dir {root}/run holds no run to resume"],
         verbs=("run",), flags=("--resume",)),
    Case("resume-empty-dir", ["error: run_dir {root}/run holds no run to resume"],
         verbs=("run",), flags=("--resume",), setup=lambda w: (w.run_dir.mkdir(), w.recipe())[1]),
    Case("run-into-foreign-dir", ["error: run_dir {root}/mine exists and is not a posttrain run directory"],
         verbs=("run",), overrides=["run_dir={root}/mine"]),
    Case("overwrite-foreign-dir", ["run_dir {root}/mine exists and is not a posttrain run directory"],
         verbs=("run",), flags=("--overwrite",), overrides=["run_dir={root}/mine"]),
    Case("resume-foreign-dir", ["run_dir {root}/mine exists and is not a posttrain run directory"],
         verbs=("run",), flags=("--resume",), overrides=["run_dir={root}/mine"]),
    # ----------------------------------------------------- added beyond the list
    Case("address-port-out-of-range", ["cluster.address: expected", "got 'head:99999'"],
         overrides=["cluster.address=head:99999"]),
    Case("run-dir-inside-a-file", ["error: run_dir: {root}/afile/run is inside {root}/afile, which is a file"],
         overrides=["run_dir={root}/afile/run"]),
    Case("reward-module-exits-on-import", ["stages[1].reward.fn: cannot import module 'exitmod': SystemExit: 3"],
         overrides=["stages.rl.reward.fn=exitmod:score"]),
    Case("model-config-not-json", ["error: model.path: {root}/badjson/config.json is not a JSON file"],
         overrides=["model={path: {root}/badjson}"]),
    Case("model-dir-without-weights", ["error: model.path: {root}/noweights has no model.safetensors"],
         overrides=["model={path: {root}/noweights}"]),
    Case("model-override-unknown-key", ["error: model.overrides.hidden_sise: not a MiniMaxConfig key"],
         overrides=["model.overrides={hidden_sise: 64}"]),
    Case("stage-model-override-unknown-key", ["error: stages[1].model_overrides.rope_thetaa: not a MiniMaxConfig key"],
         overrides=["stages.rl.model_overrides={rope_thetaa: 1.0}"]),
    Case("task-args-unknown-key", ["error: stages[0].data.task_args.n_trian: not an argument of task 'arithmetic'"],
         overrides=["stages.sft.data={task: arithmetic, task_args: {n_trian: 5}}"]),
    Case("tokenizer-path-with-char-kind", ["error: tokenizer.path: only with kind: path"],
         overrides=["tokenizer.path={root}/emptytok"]),
    Case("recipe-name-with-slash", ["error: name: must be a plain name"], overrides=["name=../../etc"]),
    Case("seed-negative", ["error: seed: must be >= 0, got -1"], overrides=["seed=-1"]),
    Case("cpus-per-learner-inf", ["error: cluster.cpus_per_learner: must be a finite number >= 0, got inf"],
         overrides=["cluster.cpus_per_learner=.inf"]),
    Case("weight-bucket-inf", ["error: stages[1].rollout.weight_bucket_mb: must be a finite number > 0, got inf"],
         overrides=["stages.rl.rollout.weight_bucket_mb=.inf"]),
    Case("yaml-syntax-error", ["error: {root}/r.yaml: not valid YAML:", "(line 3 column 1)"],
         setup=lambda w: w.recipe(b"name: t\nmodel: {preset: [\n")),
    Case("data-file-is-a-directory", ["stages[0].data.train: {root}/mine: not a directory written by datasets"],
         overrides=["stages.0.data.train={root}/mine"]),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything starts: Ray, a learner group."""
    def started(*args, **kwargs):
        raise AssertionError("work started for a bad input")

    monkeypatch.setattr("posttrain.cluster.start_ray", started)
    monkeypatch.setattr("posttrain.cluster.LearnerGroup", started)
    monkeypatch.setenv("COLUMNS", "40")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_stops_before_work_with_one_line(case, world, no_work, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(world.root))  # the user's reward modules
    recipe = case.setup(world)
    overrides = [o.replace("{root}", str(world.root)) for o in case.overrides]
    expect = [e.replace("{root}", str(world.root)) for e in case.expect]
    before = _snapshot(world.root)
    for verb in case.verbs:
        rc = main([verb, recipe, *overrides, *case.flags])
        out, err = capfd.readouterr()
        text = out + err
        lines = text.splitlines()
        assert rc == 2, f"{verb}: exit code {rc}\n{text}"
        assert len(lines) == 1, f"{verb}: {len(lines)} lines:\n{text}"
        for e in expect:
            assert e in lines[0], f"{verb}: {e!r} not in {lines[0]!r}"
        assert "Traceback" not in text
        assert _snapshot(world.root) == before, f"{verb} changed files"


def test_validate_and_run_accept_the_good_recipe(world, no_work, capfd):
    """The table's base recipe is valid: each case fails for its own reason. `run` gets past
    every check and reaches the point where Ray would start (the stand-in raises there)."""
    recipe = world.recipe()
    assert main(["validate", recipe]) == 0
    assert "OK" in capfd.readouterr().out
    with pytest.raises(AssertionError, match="work started"):
        main(["run", recipe])
    assert (world.run_dir / ".posttrain-run").is_file()  # a run dir it created, marked as ours


@pytest.mark.parametrize("args", [["validate", "{root}/r.yaml", "stages.sft.optim.lr=.nan"],
                                  ["run", "{root}/r.yaml", "--resume"]])
def test_real_cli_process_prints_one_line(world, args):
    """As a user sees it: a fresh process (import-time output would show), a narrow terminal."""
    world.recipe()
    argv = [a.replace("{root}", str(world.root)) for a in args]
    env = {**os.environ, "COLUMNS": "40", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert len(text.splitlines()) == 1 and text.startswith("error: "), text
    assert not world.run_dir.exists()
