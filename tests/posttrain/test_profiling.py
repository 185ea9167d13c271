"""posttrain.profiling: a report holds the profiled steps alone (their wall time and operators, not
what runs between them), counts phases per step, and is written when a window ends early."""
from __future__ import annotations

import re

import torch

from posttrain import profiling
from posttrain.profiling import StepProfiler, phase


def _steps(prof: StepProfiler, steps: range, now: list[float], between=lambda: None) -> None:
    for step in steps:
        now[0] += 100.0  # time between steps (an rl learner waiting for the next batch)
        between()
        prof.begin(step)
        prof.begin(step)  # a trainer calling begin once per micro-batch does not restart the clock
        with phase("forward"):
            torch.ones(4, 4).sum()
        now[0] += 5.0
        prof.end(step)


def test_a_report_holds_the_windows_steps_alone(tmp_path, monkeypatch):
    """Steps 2-3 of 1-4 profiled, 5 s each with 100 s between: 5000 ms per step, one forward per
    step, and an operator run between the two profiled steps is not in the report."""
    now = [0.0]
    monkeypatch.setattr(profiling, "_now", lambda: now[0])
    prof = StepProfiler((2, 3), str(tmp_path), rank=1)
    _steps(prof, range(1, 5), now, between=lambda: torch.ones(8).cumsum(0))
    text = (tmp_path / "rank1.txt").read_text()
    assert text.startswith("# rank 1, optimizer steps 2-3 of the window 2-3\n")
    assert re.search(r"^wall 5000\.0 ms per step \(host, inside the steps", text, re.M)
    assert re.search(r"^forward \| [\d.]+ \| 0\.0 \| 1$", text, re.M)
    assert "aten::sum" in text and "aten::cumsum" not in text
    assert (tmp_path / "rank1.trace.json.gz").exists() and prof.written == tmp_path / "rank1.txt"


def _closed_early(root, name: str, window: tuple[int, int], steps: range, now: list[float], why: str,
                  cut_short: bool = False) -> str:
    """Run `steps` through a profiler of `window` (and begin one more that never ends when
    `cut_short`), close it with `why`; its report's text, or '' when none was written."""
    prof = StepProfiler(window, str(root / name), rank=0)
    _steps(prof, steps, now)
    if cut_short:  # the next step raises before it ends
        prof.begin(steps.stop)
        now[0] += 5.0
    assert prof.written is None
    prof.close(why)
    report = root / name / "rank0.txt"
    return report.read_text() if report.exists() else ""


def test_a_window_that_ends_early_is_reported_up_to_where_it_got(tmp_path, monkeypatch):
    """The stage made 3 of the window's 5 steps (rl steps without an informative group make no
    update), or a step raised: close() writes what was recorded and says why."""
    now = [0.0]
    monkeypatch.setattr(profiling, "_now", lambda: now[0])
    ended = "the stage ended before the window's last step"
    text = _closed_early(tmp_path, "short", (2, 5), range(1, 4), now, ended)
    assert text.startswith(f"# rank 0, optimizer steps 2-3 of the window 2-5 ({ended})")
    assert re.search(r"^forward \| [\d.]+ \| 0\.0 \| 1$", text, re.M)

    text = _closed_early(tmp_path, "raised", (1, 2), range(1, 2), now, "step 2 raised RuntimeError", cut_short=True)
    assert text.startswith("# rank 0, optimizer steps 1-1 and one cut short of the window 1-2 (step 2 raised RuntimeError)")
    assert re.search(r"^wall 5000\.0 ms per step", text, re.M)

    assert _closed_early(tmp_path, "never", (3, 4), range(1, 3), now, ended) == ""
    assert not (tmp_path / "never").exists()
