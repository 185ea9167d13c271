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
    back (the device has finished the step); the report is written at `end(last)`. The wall time
    reported is the steps' own (begin to end), not the time between them (an rl learner waits
    there while the next batch is generated)."""

    def __init__(self, window: tuple[int, int], out_dir: str, rank: int) -> None:
        self.first, self.last = window
        self.out_dir = Path(out_dir)
        self.rank = rank
        self._prof: Optional[torch.profiler.profile] = None
        self._step_started: Optional[float] = None
        self._in_steps = 0.0  # seconds inside the window's steps
        self.written: Optional[Path] = None

    def begin(self, step: int) -> None:
        if not self.first <= step <= self.last:
            return
        if step == self.first and self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
        if self._step_started is None:  # a trainer may call begin once per micro-batch of the step
            self._step_started = _now()

    def end(self, step: int) -> None:
        if self._prof is None or self._step_started is None:
            return
        self._in_steps += _now() - self._step_started
        self._step_started = None
        if step != self.last:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        steps = self.last - self.first + 1
        path = self.out_dir / f"rank{self.rank}.txt"
        path.write_text(report(prof, self._in_steps, steps,
                               header=f"rank {self.rank}, optimizer steps {self.first}-{self.last}"))
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json.gz"))
        self.written = path


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
