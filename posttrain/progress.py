"""Console progress: one rich bar per stage with the latest loss/reward beside it.

On a terminal it is a live bar; when output goes to a file or pipe (CI, `tee`) it prints a
plain line every tenth of the stage instead, so logs stay readable.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, console: Console, progress: Progress | None, name: str, total: int, done: int):
        self._c, self._p, self._name, self._total, self._done = console, progress, name, total, done
        self._task = progress.add_task(name, total=total, completed=done) if progress else None
        self._every = max(1, total // 10)

    def advance(self, **shown: float) -> None:
        self._done += 1
        extra = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self._p is not None:
            self._p.update(self._task, advance=1, description=f"{self._name}  {extra}")
        elif self._done % self._every == 0 or self._done == self._total:
            self._c.print(f"{self._name}: step {self._done}/{self._total}  {extra}")


@contextlib.contextmanager
def stage_progress(console: Console, name: str, total: int, start: int = 0) -> Iterator[_Bar]:
    if not console.is_terminal:
        yield _Bar(console, None, name, total, start)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    with progress:
        yield _Bar(console, progress, name, total, start)
