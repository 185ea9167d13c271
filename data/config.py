"""DataConfig: a stage's data (the recipe's `stages[i].data`), checked when it is built.

Invalid values raise ValueError("<field>: ...") at construction; the recipe loader reports them
under the key path (stages[i].data.<field>). Checks that depend on the stage kind (packing,
mixing, the format a stage reads) live with the stage's own validator. The rows of local files
are read by `check_rows`, which the recipe calls once the stage is known to be consistent (so a
file in the wrong format is reported as such, not as its first row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

Format = Literal["prompt_completion", "chat", "preference", "rl"]


def _known_task(task: Optional[str], key: str, args: dict[str, Any]) -> None:
    """A task of TASKS whose writer takes every key of `args` (task_args)."""
    import inspect

    from posttrain.data.tasks import TASKS

    if task is None:
        return
    if task not in TASKS:
        raise ValueError(f"{key}: unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
    params = inspect.signature(TASKS[task].write).parameters
    takes = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "seed"]
    for arg in args:
        if arg not in takes:
            raise ValueError(f"{key}_args.{arg}: not an argument of task {task!r} (its arguments: {', '.join(takes)})")


def _existing(path: Optional[str], key: str) -> None:
    if path is None:
        return
    try:
        found = Path(path).exists()
    except OSError as e:  # a name too long for the file system, ...
        raise ValueError(f"{key}: {e.strerror}: {path}") from None
    if not found:
        raise ValueError(f"{key}: file not found: {path}")


def _rows_ok(path: Optional[str], key: str, format: str, on_bad_row: str) -> None:
    """Every row of a local file parses as `format` (streamed), as the stage will read it."""
    from posttrain.data.formats import DataError, scan_file

    if path is None:
        return
    try:
        scan_file(path, format, on_bad_row=on_bad_row)  # type: ignore[arg-type]
    except DataError as e:
        raise ValueError(f"{key}: {e}") from None


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
        _known_task(self.task, "task", self.task_args)
        _existing(self.train, "train")
        if self.max_examples is not None and not self.max_examples > 0:
            raise ValueError(f"max_examples: must be positive, got {self.max_examples}")

    def check_rows(self) -> None:
        """Read every row of `train` (streamed); ValueError("train: <file>:<row>: ...")."""
        _rows_ok(self.train, "train", self.format, "error")


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
        _known_task(self.task, "task", self.task_args)
        _existing(self.train, "train")
        _existing(self.eval, "eval")
        if not self.max_seq_len >= 1:
            raise ValueError(f"max_seq_len: must be >= 1, got {self.max_seq_len}")

    def check_rows(self) -> None:
        """Read every row of the local files (train, eval, mix[j].train) as the stage will, streamed:
        ValueError("<field>: <file>:<row>: <problem>") for the first bad one (on_bad_row: error),
        or for a file with no valid row at all (skip)."""
        _rows_ok(self.train, "train", self.format, self.on_bad_row)
        _rows_ok(self.eval, "eval", self.format, self.on_bad_row)
        for j, m in enumerate(self.mix):
            try:
                m.check_rows()
            except ValueError as e:
                raise ValueError(f"mix[{j}].{e}") from None
