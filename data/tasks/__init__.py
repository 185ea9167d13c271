"""Synthetic tasks: each writes jsonl datasets (read back through posttrain.data.load_records,
the same path as real data) and checks a model's answer.

    TASKS["arithmetic"].write(out_dir, n_train=..., n_eval=..., seed=...) -> {name: Path}
    TASKS["arithmetic"].check(completion_text, answer) -> bool
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from posttrain.data.tasks import arithmetic, coding, needle


@dataclass(frozen=True)
class Task:
    name: str
    write: Callable[..., dict[str, Path]]  # write(out_dir, *, seed, ...) -> {file name: path}
    check: Optional[Callable[[str, str], bool]]  # check(completion_text, answer) -> correct? (None: see reward)
    reward: Optional[str] = None  # when check is None: the rollout reward (REWARDS name) whose 1.0 is correct


TASKS: dict[str, Task] = {
    **{m.NAME: Task(m.NAME, m.write, m.check) for m in (arithmetic, needle)},
    coding.NAME: Task(coding.NAME, coding.write, None, coding.REWARD),
}


def write_task(name: str, out_dir: str | os.PathLike, **kwargs) -> dict[str, Path]:
    """Write task `name`'s datasets into out_dir (kwargs go to that task's write)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name].write(out_dir, **kwargs)


__all__ = ["TASKS", "Task", "write_task"]
