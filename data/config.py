"""DataConfig: a stage's data (the recipe's `stages[i].data`), checked when it is built.

Invalid values raise ValueError("<field>: ...") at construction; the recipe loader reports them
under the key path (stages[i].data.<field>). Checks that depend on the stage kind (packing,
mixing, the format a stage reads) live with the stage's own validator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

Format = Literal["prompt_completion", "chat", "preference", "rl"]


def _known_task(task: Optional[str], key: str) -> None:
    from posttrain.data.tasks import TASKS

    if task is not None and task not in TASKS:
        raise ValueError(f"{key}: unknown task {task!r} (known: {', '.join(sorted(TASKS))})")


def _existing(path: Optional[str], key: str) -> None:
    if path is not None and not Path(path).exists():
        raise ValueError(f"{key}: file not found: {path}")


@dataclass(frozen=True)
class MixSource:
    """Extra supervised data mixed into an sft stage's training examples, e.g. the short-context
    task kept in a long-context stage so that it is not forgotten (MiniMax-01 mixes short data
    into its long-context stages). Tokenised and packed with the stage's own settings."""

    task: Optional[str] = None  # a synthetic task (its sft_train file) ...
    task_args: dict[str, Any] = field(default_factory=dict)  # ... and its arguments
    train: Optional[str] = None  # or a file in `format` (exactly one of task / train)
    format: Literal["prompt_completion", "chat"] = "prompt_completion"  # how the file's rows are read
    max_examples: Optional[int] = None  # keep the first N examples (default: all)

    def __post_init__(self) -> None:
        if (self.task is None) == (self.train is None):
            raise ValueError("task: set exactly one of task (a synthetic task) or train (a file)")
        _known_task(self.task, "task")
        _existing(self.train, "train")
        if self.max_examples is not None and not self.max_examples > 0:
            raise ValueError(f"max_examples: must be positive, got {self.max_examples}")


@dataclass(frozen=True)
class DataConfig:
    """A stage's data: files on disk, or a synthetic task written to the run dir first.

    With `task`, the task's generator writes its files under `<run_dir>/data/<task>/` and
    `train`/`eval` default to that task's files for the stage kind; the same loading path as
    user data is used afterwards.
    """

    train: Optional[str] = None  # training file (jsonl, json, parquet or a datasets dir)
    eval: Optional[str] = None  # held-out file (default: the task's, if any)
    format: Format = "prompt_completion"  # how rows are read (posttrain.data.formats)
    task: Optional[str] = None  # a synthetic task (posttrain.data.TASKS) instead of files
    task_args: dict[str, Any] = field(default_factory=dict)  # the task generator's arguments
    on_bad_row: Literal["error", "skip"] = "error"  # a malformed row stops the run, or is skipped and counted
    max_seq_len: int = 512  # tokens per example (sft truncates the response) or per packed row
    # sft and dpo: pack tokenised examples (dpo: each micro-batch's chosen and rejected documents)
    # into rows of max_seq_len (best-fit decreasing, documents never mixed)
    pack: bool = False
    pack_mode: Literal["bfd", "split"] = "bfd"  # sft: "split" cuts longer examples into pieces instead of truncating
    mix: list[MixSource] = field(default_factory=list)  # sft only: more training sources mixed in

    def __post_init__(self) -> None:
        _known_task(self.task, "task")
        _existing(self.train, "train")
        _existing(self.eval, "eval")
        if not self.max_seq_len >= 1:
            raise ValueError(f"max_seq_len: must be >= 1, got {self.max_seq_len}")
