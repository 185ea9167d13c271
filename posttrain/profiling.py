"""torch.profiler over a window of a stage's optimizer steps on each learner rank
(`learner.profile: [first, last]`): where a step's host and device time goes.

Each rank writes `<stage dir>/profile/rank<R>.txt` when the window closes: the wall time per
step (host clock, from the first micro-batch to the metrics read back), the device's busy time
per step, the step's phases (`posttrain/...` ranges: forward and backward of each micro-batch, the
optimizer step, the metrics read back) and the top operators by self device time and by self host
time. Beside it, `rank<R>.trace.json.gz`: the Chrome / Perfetto trace of the window.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

PHASE_PREFIX = "posttrain/"


def _now() -> float:
    return time.perf_counter()


def phase(name: str) -> Any:
    """A named range of a learner step (`posttrain/<name>`) for the profile's phase table; a
    no-op apart from a few microseconds when no profiler records."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


class StepProfiler:
    """Records optimizer steps `window` = (first, last) (1-based, inclusive) of one stage.
    Call `begin(n)` before step n's first micro-batch and `end(n)` once its metrics are read
    back (the device has finished the step); the report is written at `end(last)`, or by
    `close()` when the window ends early (the stage made fewer updates, a step raised, a run
    resumed inside the window starts at the step it resumes from). Only the steps themselves
    are recorded: collection pauses between them (an rl learner waits there while the next
    batch is generated; evals and checkpoints run there), and their wall time is counted from
    begin to end."""

    def __init__(self, window: tuple[int, int], out_dir: str, rank: int) -> None:
        self.first, self.last = window
        self.out_dir = Path(out_dir)
        self.rank = rank
        self._prof: Optional[torch.profiler.profile] = None
        self._acts: list[Any] = []
        self._paused = False
        self._step_started: Optional[float] = None
        self._in_steps = 0.0  # seconds inside the recorded steps
        self._steps: list[int] = []  # the steps recorded (ended)
        self._notes: list[str] = []
        self.written: Optional[Path] = None

    def begin(self, step: int) -> None:
        if self.written is not None or not self.first <= step <= self.last:
            return
        if self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            self._acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=self._acts)
            self._prof.__enter__()
        elif self._paused:
            self._toggle(True)
        if self._step_started is None:  # a trainer may call begin once per micro-batch of the step
            self._step_started = _now()

    def end(self, step: int) -> None:
        if self._prof is None or self._step_started is None:
            return
        self._in_steps += _now() - self._step_started
        self._step_started = None
        self._steps.append(step)
        if step >= self.last:
            self.close()
        else:
            self._toggle(False)

    def close(self, why: str = "") -> None:
        """Stop recording and write the report of the steps recorded so far (a step cut short
        by an error counts as one, and the report says so); nothing when none was."""
        if self._prof is None:
            return
        if self._step_started is not None:  # a step did not end (it raised)
            self._in_steps += _now() - self._step_started
            self._step_started = None
            self._steps.append(-1)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        if why:
            self._notes.append(why)
        if not self._steps:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        done = [n for n in self._steps if n > 0]
        span = f"{done[0]}-{done[-1]}" if done else "none complete"
        if -1 in self._steps:
            span += " and one cut short"
        header = f"rank {self.rank}, optimizer steps {span} of the window {self.first}-{self.last}"
        if self._notes:
            header += " (" + "; ".join(self._notes) + ")"
        path = self.out_dir / f"rank{self.rank}.txt"
        path.write_text(report(prof, self._in_steps, len(self._steps), header=header))
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json.gz"))
        self.written = path

    def _toggle(self, on: bool) -> None:
        """Pause or resume collection between steps; where the profiler cannot, it records the
        time between steps too and the report says so."""
        assert self._prof is not None
        try:
            self._prof.toggle_collection_dynamic(on, self._acts)
            self._paused = not on
        except Exception as err:  # noqa: BLE001 - an experimental torch API: report, do not fail the step
            note = f"could not pause between steps ({type(err).__name__}): operators there are included"
            if note not in self._notes:
                self._notes.append(note)


def report(prof: Any, wall: float, steps: int, header: str, row_limit: int = 25) -> str:
    """The text report of a finished profile of `steps` steps that took `wall` host seconds (their
    own time, without the time between them)."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    # kernels, each once (the ops that launched them hold their time too); on CUDA a phase's range
    # also appears as a device-side annotation spanning its kernels: not a kernel itself
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith(PHASE_PREFIX)]
    device_s = sum(e.self_device_time_total for e in kernels) / 1e6
    lines = [f"# {header}",
             f"wall {wall / steps * 1e3:.1f} ms per step (host, inside the steps, under the profiler); device busy "
             f"{device_s / steps * 1e3:.1f} ms per step ({device_s / wall:.0%} of the wall); "
             f"{sum(e.count for e in kernels) / steps:.0f} kernels per step", "",
             "phase | host ms per step | device ms per step (span of its kernels) | calls per step"]
    # name -> [host us, device us of the device-side annotation, device us of the kernels the host
    # range launched itself (CPU profiles, or no annotation), calls]
    phases: dict[str, list[float]] = {}
    for e in events:
        if e.key.startswith(PHASE_PREFIX):
            row = phases.setdefault(e.key[len(PHASE_PREFIX):], [0.0, 0.0, 0.0, 0.0])
            if e.device_type == DeviceType.CUDA:
                row[1] += e.device_time_total
            else:
                row[0] += e.cpu_time_total
                row[2] += e.device_time_total
                row[3] += e.count
    for name, (host, span, launched, calls) in sorted(phases.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{name} | {host / 1e3 / steps:.1f} | {(span or launched) / 1e3 / steps:.1f} | {calls / steps:g}")
    lines.append("")
    if device_s > 0:
        lines += ["## top operators by self device time",
                  _clean(events.table(sort_by="self_device_time_total", row_limit=row_limit, max_name_column_width=70)),
                  ""]
    lines += ["## top operators by self host time",
              _clean(events.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=70))]
    return "\n".join(lines) + "\n"


def _clean(table: str) -> str:
    return re.sub(r"[ \t]+\n", "\n", table)
