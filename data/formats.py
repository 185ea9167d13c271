"""Dataset formats, typed records, and loading from local files (no hub, no network).

Files: `.jsonl` (one JSON object per line, UTF-8; blank lines ignored), `.json` (a list of
objects), `.parquet`, or a directory written by `datasets.Dataset.save_to_disk` (a
`DatasetDict` directory needs `split=`). Row numbers in errors are 1-based: the line number
for `.jsonl`, the list/table index + 1 otherwise.

Formats (required keys; any other key of a row is kept in the record's `meta`):

    prompt_completion   prompt: str, completion: str
    chat                messages: [{role, content}, ...]; roles system/user/assistant; at
                        least one assistant message (otherwise nothing would be trained)
    preference          prompt: str | messages, chosen: str | messages, rejected: same
                        (message lists for chosen/rejected are the turns that follow the
                        prompt, usually one assistant message)
    rl                  prompt: str | messages, answer: str (the reference answer)

Every string (prompt, completion, answer, message content) must be non-empty after stripping
whitespace. A row that breaks a rule raises `DataError("<file>:<row>: <problem>")`, or with
`on_bad_row="skip"` is counted in `LoadResult.n_skipped` with its message in `errors`.
`scan_file` applies the same rules to every row without keeping the records (load-time checks).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Union

ROLES = ("system", "user", "assistant")
FORMATS = ("prompt_completion", "chat", "preference", "rl")


class DataError(ValueError):
    """A dataset file or row is missing or malformed; the message names file and row."""


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


Messages = tuple[Message, ...]


@dataclass(frozen=True)
class PromptCompletionRecord:
    prompt: str
    completion: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ChatRecord:
    messages: Messages
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class RLRecord:
    prompt: Union[str, Messages]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


Record = Union[PromptCompletionRecord, ChatRecord, PreferenceRecord, RLRecord]


@dataclass(frozen=True)
class LoadResult:
    records: list  # list[Record], all of the requested format
    n_skipped: int
    errors: list[str]  # one message per skipped row, in file order


class _RowError(Exception):
    """Raised by the row parsers; load_records adds the file and row number."""


# ---------------------------------------------------------------------------------------
# Row parsers: dict -> record, raising _RowError with the problem (no file/row yet).


def _get(row: dict, key: str) -> Any:
    if key not in row:
        raise _RowError(f'key "{key}" missing')
    # Columnar files (parquet, datasets) store a key absent from some rows as null.
    if row[key] is None:
        raise _RowError(f'key "{key}" is null')
    return row[key]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"{where}: empty string")
    return value


def _messages(value: Any, where: str) -> Messages:
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"{where}: expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _RowError(f"{where}: empty message list")
    out = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise _RowError(f"{at}: expected an object with role and content, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise _RowError(f'{at}: key "{key}" missing')
        role = m["role"]
        if role not in ROLES:
            raise _RowError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        out.append(Message(role, _text(m["content"], f"{at}.content")))
    return tuple(out)


def _text_or_messages(value: Any, where: str) -> Union[str, Messages]:
    return _messages(value, where) if isinstance(value, (list, tuple)) else _text(value, where)


def _meta(row: dict, used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


def _parse_prompt_completion(row: dict) -> PromptCompletionRecord:
    prompt = _text(_get(row, "prompt"), '"prompt"')
    completion = _text(_get(row, "completion"), '"completion"')
    return PromptCompletionRecord(prompt, completion, _meta(row, ("prompt", "completion")))


def _parse_chat(row: dict) -> ChatRecord:
    messages = _messages(_get(row, "messages"), '"messages"')
    if not any(m.role == "assistant" for m in messages):
        raise _RowError('"messages": no assistant message (nothing to train on)')
    return ChatRecord(messages, _meta(row, ("messages",)))


def _parse_preference(row: dict) -> PreferenceRecord:
    prompt = _text_or_messages(_get(row, "prompt"), '"prompt"')
    chosen = _text_or_messages(_get(row, "chosen"), '"chosen"')
    rejected = _text_or_messages(_get(row, "rejected"), '"rejected"')
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(side, tuple) and not any(m.role == "assistant" for m in side):
            raise _RowError(f'"{name}": no assistant message')
    return PreferenceRecord(prompt, chosen, rejected, _meta(row, ("prompt", "chosen", "rejected")))


def _parse_rl(row: dict) -> RLRecord:
    prompt = _text_or_messages(_get(row, "prompt"), '"prompt"')
    answer = _text(_get(row, "answer"), '"answer"')
    return RLRecord(prompt, answer, _meta(row, ("prompt", "answer")))


_PARSERS = {
    "prompt_completion": _parse_prompt_completion,
    "chat": _parse_chat,
    "preference": _parse_preference,
    "rl": _parse_rl,
}


def parse_row(row: Any, format: str) -> Record:
    """Validate one row (a dict) of `format` and return its record; raises _RowError."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    return _PARSERS[format](row)


# ---------------------------------------------------------------------------------------
# File readers: yield (row_number, row_or_error). A line that is not valid JSON yields a
# _RowError so it can be skipped like any other bad row.


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    # bytes, decoded line by line: a file of random bytes is a bad row, not a decode error
    # from deep inside the reader
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _RowError(_not_utf8(e))
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _RowError(f"invalid JSON: {e.msg} (column {e.colno})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {_not_utf8(e)}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    yield from enumerate(table.to_pylist(), start=1)


def _read_datasets_dir(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a directory written by datasets save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise DataError(f"{path}: a DatasetDict; pass split= one of {sorted(ds)}")
        ds = ds[split]
    elif split is not None:
        raise DataError(f"{path}: a single Dataset, split={split!r} does not apply")
    yield from enumerate(ds, start=1)


def _rows(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a name too long for the file system
        raise DataError(f"{path}: {e.strerror}") from None
    if not exists:
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return _read_datasets_dir(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json, .parquet or a datasets directory)")


def _records(p: Path, format: str, on_bad_row: str, split: str | None) -> Iterator[Union[Record, str]]:
    """Each row of `p` as its record, or (on_bad_row="skip") as its error message."""
    if format not in _PARSERS:
        raise DataError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f'on_bad_row must be "error" or "skip", got {on_bad_row!r}')
    try:
        for rowno, row in _rows(p, split):
            try:
                if isinstance(row, _RowError):
                    raise row
                yield parse_row(row, format)
            except _RowError as e:
                msg = f"{p}:{rowno}: {e}"
                if on_bad_row == "error":
                    raise DataError(msg) from None
                yield msg
    except OSError as e:  # unreadable: permissions, a directory named like a file, I/O errors
        raise DataError(f"{p}: cannot read: {e.strerror or e}") from None


def _none_valid(p: Path, format: str, n_bad: int, first: str) -> DataError:
    detail = f" ({n_bad} bad rows, first: {first})" if n_bad else ""
    return DataError(f"{p}: no valid {format} rows{detail}")


def load_records(
    path: str | os.PathLike,
    format: str,
    *,
    on_bad_row: Literal["error", "skip"] = "error",
    split: str | None = None,
) -> LoadResult:
    """Load and validate every row of a local dataset file as typed records of `format`.

    on_bad_row="error" raises DataError("<path>:<n>: <problem>") at the first bad row;
    "skip" drops bad rows, counting them. A missing file, an unreadable file, or a file with
    no valid rows at all raises DataError naming the file.
    """
    p = Path(path)
    records: list = []
    errors: list[str] = []
    for item in _records(p, format, on_bad_row, split):
        (errors if isinstance(item, str) else records).append(item)
    if not records:
        raise _none_valid(p, format, len(errors), errors[0] if errors else "")
    return LoadResult(records, len(errors), errors)


def scan_file(path: str | os.PathLike, format: str, *, on_bad_row: Literal["error", "skip"] = "error",
              split: str | None = None) -> tuple[int, int]:
    """What load_records would say about `path`, streamed: every row parsed and dropped (a
    .jsonl file is read line by line). Returns (valid rows, skipped rows); raises the same
    DataError load_records would (the first bad row with on_bad_row="error")."""
    p = Path(path)
    valid = skipped = 0
    first = ""
    for item in _records(p, format, on_bad_row, split):
        if isinstance(item, str):
            skipped += 1
            first = first or item
        else:
            valid += 1
    if not valid:
        raise _none_valid(p, format, skipped, first)
    return valid, skipped


def validate_file(path: str | os.PathLike, format: str, *, split: str | None = None) -> int:
    """Check a dataset file before expensive work starts; returns its number of rows.

    Parses every row (cheap next to tokenization or training) and raises DataError naming
    the file and row of the first problem.
    """
    return scan_file(path, format, on_bad_row="error", split=split)[0]
