"""Checkpoints and atomic writes: a reader (or a resumed run) sees a complete directory or none.

Everything is written into a hidden sibling temp dir and moved into place with one
rename; a crash mid-write leaves only a temp dir that the next run deletes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from posttrain.data.io import write_json_atomic, write_jsonl_atomic

__all__ = ["CheckpointConfig", "atomic_dir", "clean_temp", "write_json_atomic", "write_jsonl_atomic"]


@dataclass(frozen=True)
class CheckpointConfig:
    """When a stage writes resumable state (the recipe's `stages[i].checkpoint:`); the final
    Hugging Face checkpoint is always written at the stage's end."""

    every: int = 0  # optimizer steps between resumable states; 0: only at the stage's end
    keep_last: int = 1  # resumable states kept (older ones are deleted)

    def __post_init__(self) -> None:
        if not self.every >= 0:
            raise ValueError(f"every: must be >= 0 (0: only at the end), got {self.every}")
        if not self.keep_last >= 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces `target` (an existing one is swapped out)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def clean_temp(parent: Path) -> None:
    """Remove temp dirs left by an interrupted write."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
