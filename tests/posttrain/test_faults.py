"""The driver killed at the worst moments: `--resume` ends with bitwise the weights of an
uninterrupted run, never trains zero steps, never repeats one; a half-written checkpoint is
never taken for the last complete one.

Real processes: `posttrain run` in its own session, SIGKILLed by the fault hook
(POSTTRAIN_KILL_AT, posttrain/faults.py) exactly at each point, with its local Ray instance.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from safetensors.torch import load_file

from posttrain.stages.common import FILES, _list_files, latest_state

RECIPE = """
name: faults
seed: 3
model: {{preset: tiny-hybrid}}
cluster: {{num_cpus: 2, reuse_learners: true}}
run_dir: {run_dir}
stages:
  - name: a
    kind: sft
    steps: 4
    data: {{train: {train}, max_seq_len: 16}}
    optim: {{lr: 3.0e-3}}
    batch: {{global_size: 8, micro_size: 8}}
    checkpoint: {{every: 1}}
  - name: b
    kind: sft
    steps: 3
    data: {{train: {train}, max_seq_len: 16}}
    optim: {{lr: 1.0e-3}}
    batch: {{global_size: 8, micro_size: 8}}
    checkpoint: {{every: 1}}
"""


@contextlib.contextmanager
def _driver(recipe: Path, *args: str, kill_at: str | None = None) -> Iterator[subprocess.Popen]:
    """`posttrain run RECIPE ARGS` in a session of its own, output captured; whatever of that
    session is left at the end is killed (the fault hook kills the group; be sure)."""
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_KILL_AT"}
    if kill_at:
        env["POSTTRAIN_KILL_AT"] = kill_at
    p = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), *args], env=env,
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield p
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(recipe: Path, *flags: str, kill_at: str | None = None) -> tuple[int, str]:
    with _driver(recipe, *flags, kill_at=kill_at) as p:
        out, _ = p.communicate(timeout=600)
    return p.returncode, out


def _train_steps(run_dir: Path) -> dict[str, list[int]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out: dict[str, list[int]] = {}
    for r in rows:
        if r["split"] == "train":
            out.setdefault(r["stage"], []).append(r["step"])
    return out


@pytest.mark.slow
def test_driver_killed_at_each_point_resumes_to_identical_weights(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                             for a in range(8) for b in range(8)))

    def recipe(run_dir: Path) -> Path:
        p = tmp_path / f"{run_dir.name}.yaml"
        p.write_text(textwrap.dedent(RECIPE.format(run_dir=run_dir, train=train)))
        return p

    straight = tmp_path / "straight"
    rc, out = _run(recipe(straight))
    assert rc == 0, out[-3000:]
    # cluster.reuse_learners: the uninterrupted run trains b on a's learners; below, every run
    # that reaches b after a kill trains it on new ones, and the weights must not tell them apart
    assert "b: the learners of a go on with its final weights" in out, out[-3000:]

    broken = tmp_path / "broken"
    r = recipe(broken)
    state_a = broken / "stages" / "00-a" / "state"
    # (kill point, what the next --resume must say, what must be on disk after the kill)
    chain = [
        ("step:a:2", "a: resuming from step 1"),  # mid-step: step 2 computed, not logged or saved
        ("checkpoint:a:3", "a: resuming from step 2"),  # the step-3 state half written (temp dir)
        ("step:a:4", "a: resuming from step 3"),  # exactly after the stage's last step, before its final
        ("stage_done:a", "a: already complete, skipped"),  # exactly at the boundary to stage b
        ("learner:2", "b: resuming from step 1"),  # b's learner process dies before its step 2
    ]
    rc, out = _run(r, kill_at=chain[0][0])
    assert rc == -signal.SIGKILL, out[-3000:]
    after: dict[str, str] = {}  # the output of the run resuming after each kill point
    for i, (point, expect) in enumerate(chain):
        if point.startswith("checkpoint"):
            assert any(p.name.startswith(".step-000003.tmp-") for p in state_a.iterdir()), "no half-written state"
            assert not (state_a / "step-000003").exists()
        nxt = chain[i + 1][0] if i + 1 < len(chain) else None
        rc, out = _run(r, "--resume", kill_at=nxt)
        after[point] = out
        assert expect in out, (point, out[-3000:])
        if nxt and nxt.startswith("learner"):  # the driver survives: it stops with one clear line
            lines = [x for x in out.splitlines() if x.startswith("error: learner rank 0 died")]
            assert rc == 1 and len(lines) == 1 and "--resume" in lines[0], out[-3000:]
            assert "Traceback" not in out
        else:
            assert rc == (-signal.SIGKILL if nxt else 0), (point, rc, out[-3000:])
    assert "b: resuming" not in after["stage_done:a"]  # stage b started fresh from a's manifest
    assert "go on with its final weights" not in after["stage_done:a"]  # on new learners

    for stage in ("00-a", "01-b"):
        a = load_file(str(straight / "stages" / stage / "final" / "model.safetensors"))
        b = load_file(str(broken / "stages" / stage / "final" / "model.safetensors"))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst == 0.0, f"{stage}: resumed weights differ by up to {worst}"
    # every step of every stage trained and logged exactly once, in order
    assert _train_steps(broken) == _train_steps(straight) == {"a": [1, 2, 3, 4], "b": [1, 2, 3]}


def _stoppable(tmp_path: Path) -> tuple[Path, Path]:
    """(recipe, run dir) of RECIPE on the addition rows, for the signal tests."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                             for a in range(8) for b in range(8)))
    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(run_dir=run_dir, train=train)))
    return recipe, run_dir


def _wait_for_a_saved_step(p: subprocess.Popen, run_dir: Path) -> None:
    """Until stage a has written a resumable state (mid-stage from then on)."""
    state, deadline = run_dir / "stages" / "00-a" / "state", time.monotonic() + 300
    while not (state.is_dir() and any(x.name.startswith("step-") for x in state.iterdir())):
        assert p.poll() is None and time.monotonic() < deadline, p.stdout.read()[-3000:] if p.stdout else ""
        time.sleep(0.1)


def _one_stopped_line(out: str, run_dir: Path) -> str:
    stopped = [x for x in out.splitlines() if x.startswith("stopped:")]
    assert len(stopped) == 1 and stopped[0].startswith(f"stopped: SIGTERM; {run_dir}") and "--resume" in stopped[0], out[-3000:]
    assert "Traceback" not in out and "SIGTERM received" not in out, out[-3000:]
    return stopped[0]


@pytest.mark.slow
def test_sigterm_stops_the_run_with_one_line_and_resume_continues_it(tmp_path):
    """What a scheduler's stop or `kill` does: SIGTERM to the driver alone, mid-stage. The run
    stops with one line naming the signal and the way back (exit 143; no traceback, no stack
    dump from Ray's core); --resume continues from the last saved step, and every step trains
    and is logged exactly once."""
    recipe, run_dir = _stoppable(tmp_path)
    longer = "stages.0.steps=40"
    with _driver(recipe, longer) as p:
        _wait_for_a_saved_step(p, run_dir)
        p.send_signal(signal.SIGTERM)  # the driver alone
        out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out[-3000:]
    assert "did not shut down" not in _one_stopped_line(out, run_dir)  # the clean path, not the watchdog
    rc, out = _run(recipe, "--resume", longer)
    assert rc == 0 and "a: resuming from step " in out, out[-3000:]
    assert _train_steps(run_dir) == {"a": list(range(1, 41)), "b": [1, 2, 3]}


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_stops_with_one_line_and_leaves_no_process(tmp_path, monkeypatch):
    """What `timeout` and Slurm's scancel do: SIGTERM to every process of the group, Ray's raylet
    included, which dies of it; the driver's shutdown then waits on Ray forever (before the
    watchdog: killed only by `timeout -k`'s SIGKILL, no closing line). Now, within the grace
    period, one closing line, exit 143, and nothing of the run left running."""
    recipe, run_dir = _stoppable(tmp_path)
    monkeypatch.setenv("POSTTRAIN_STOP_GRACE_S", "5")
    with _driver(recipe, "stages.0.steps=400") as p:
        _wait_for_a_saved_step(p, run_dir)
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 143, out[-3000:]
        _one_stopped_line(out, run_dir)
        deadline = time.monotonic() + 20
        while True:  # every process of the group gone (Ray's workers exit when their raylet is gone)
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "processes of the run are still alive"
            time.sleep(0.2)


WATCHED = """
import os, sys, time
from posttrain import cluster

def hook(why):
    print("hook", why, flush=True)
    raise SystemExit(1)  # what rich's console does on a broken pipe

cluster.ON_STUCK_STOP[:] = [hook]
cluster._WATCHDOG.arm()
cluster.STOPPED_BY.append("SIGTERM")
cluster._WATCHDOG.requested.set()  # what the SIGTERM handler does
if sys.argv[1] == "settles":
    cluster._WATCHDOG.settled.set()  # what settle_stop does once Ray is down
time.sleep(6)
print("lived", flush=True)
"""


@pytest.mark.parametrize("case", ["stuck", "settles"])
def test_the_stop_watchdog_exits_a_stuck_stop_even_when_its_hook_raises_and_spares_a_settled_one(case, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_STOP_GRACE_S", "0.5")
    done = subprocess.run([sys.executable, "-c", WATCHED, case], capture_output=True, text=True, timeout=60)
    if case == "stuck":  # the hook ran, its SystemExit did not stop the exit, and the exit came mid-sleep
        assert done.returncode == 143 and "hook SIGTERM" in done.stdout and "lived" not in done.stdout, done
    else:
        assert done.returncode == 0 and "lived" in done.stdout and "hook" not in done.stdout, done


def test_stop_grace_is_read_from_the_environment_with_a_safe_default(monkeypatch):
    from posttrain.cluster import stop_grace_s

    for value, expect in [("5", 5.0), ("0", 0.0), ("abc", 20.0), ("-1", 20.0), ("inf", 20.0), ("nan", 20.0)]:
        monkeypatch.setenv("POSTTRAIN_STOP_GRACE_S", value)
        assert stop_grace_s() == expect, value
    monkeypatch.delenv("POSTTRAIN_STOP_GRACE_S")
    assert stop_grace_s() == 20.0


def _state(root: Path, step: int, files: dict[str, bytes], listed: bool = True) -> Path:
    d = root / f"step-{step:06d}"
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    if listed:
        (d / FILES).write_text(json.dumps(_list_files(d)))
    return d


def test_half_written_state_is_never_the_latest(tmp_path):
    root = tmp_path / "state"
    whole = {"progress.json": b'{"step": 0}', "ds/model_states.pt": b"w" * 100, "ds/optim_states.pt": b"o" * 50}
    good = _state(root, 2, whole)
    missing = _state(root, 3, whole)
    (missing / "ds" / "optim_states.pt").unlink()  # a file lost
    short = _state(root, 4, whole)
    (short / "ds" / "model_states.pt").write_bytes(b"w" * 10)  # a file cut short
    _state(root, 5, whole, listed=False)  # never finished (no file list)
    _state(root, 6, {k: v for k, v in whole.items() if k != "progress.json"})  # no progress
    temp = root / ".step-000007.tmp-4242"
    temp.mkdir()
    (temp / "progress.json").write_text('{"step": 7}')

    assert latest_state(SimpleNamespace(state_root=root)) == good
    assert not temp.exists()  # temp dirs of an interrupted write are deleted


class _Dies:
    def __init__(self, how: str):
        if how == "raise":
            raise OSError("[Errno 98] Address already in use")

    def exit(self) -> None:
        os._exit(3)


def test_a_dead_actor_is_reported_with_its_cause(ray_local):
    """LearnerLost's one line says why the rank died: the constructor's exception, or how the
    process ended."""
    from posttrain.cluster import death_cause

    ray = ray_local
    causes = []
    for how in ("raise", "exit"):
        actor = ray.remote(num_cpus=0)(_Dies).remote(how)
        with pytest.raises(ray.exceptions.RayActorError) as e:
            ray.get(actor.exit.remote())
        causes.append(death_cause(e.value))
    assert causes[0] == "its constructor raised OSError: [Errno 98] Address already in use", causes
    assert causes[1].startswith("SYSTEM_ERROR: ") and "\n" not in causes[1], causes
