"""posttrain.profiling: the report's wall time is the profiled steps' own, and phases are counted per step."""
from __future__ import annotations

import re

import torch

from posttrain import profiling
from posttrain.profiling import StepProfiler, phase


def test_wall_per_step_excludes_the_time_between_steps_and_outside_the_window(tmp_path, monkeypatch):
    """Steps 2-3 of 1-4 profiled; each step takes 5 clock units, 100 pass between steps (an rl
    learner waiting for the next batch): the report gives 5 per step, and each phase's calls per
    step; a trainer calling begin once per micro-batch does not restart the step's clock."""
    clock = iter(range(0, 10_000, 5))  # every reading advances 5 units (s)
    now = [0.0]
    monkeypatch.setattr(profiling, "_now", lambda: now[0])
    prof = StepProfiler((2, 3), str(tmp_path), rank=1)
    for step in range(1, 5):
        now[0] = next(clock) * 100.0  # 100 s or more since the last step ended
        prof.begin(step)
        prof.begin(step)  # a second micro-batch of the same step
        with phase("forward"):
            torch.ones(4, 4).sum()
        now[0] += 5.0
        prof.end(step)
        if step < 3:
            assert prof.written is None
    text = (tmp_path / "rank1.txt").read_text()
    assert text.startswith("# rank 1, optimizer steps 2-3")
    assert re.search(r"^wall 5000\.0 ms per step \(host, inside the steps", text, re.M)
    assert re.search(r"^forward \| [\d.]+ \| 0\.0 \| 1$", text, re.M)
    assert (tmp_path / "rank1.trace.json.gz").exists() and prof.written == tmp_path / "rank1.txt"
