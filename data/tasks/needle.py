"""Needle in a haystack: retrieve the value of one key from a long context.

A prompt is a context of about `length` tokens followed by a question line; the needle
"key=value" sits at relative depth `depth` (0 = first line, 1 = last line before the
question). Two kinds of filler:

- "kv" (default): every filler line is itself a "key=value" pair with a distinct 4-letter key
  and a 4-digit value, so the model must really look the key up (no "odd line out" shortcut);
- "text": filler sentences of common words; only the needle line has the "key=value" shape.

Example (kv):   "qmzt=5180\\nable=9921\\n...\\nQ: able"   completion / answer: "9921"

Difficulty knobs: `key_chars` (letters per key, default 4) and `value_digits` (digits per value,
default 4; 1 = a single digit 0-9). A tiny model learns the easy setting `key_chars=2,
value_digits=1` quickly (one digit to copy, a two-letter key to match) while the default 4-digit
values need position-by-position copying. With the kv filler every key of a context is
distinct, so `26 ** key_chars` must exceed the number of lines of the longest context.

Lengths are counted in tokens of `tokenizer` (encoding each line separately, so exact for
the char tokenizer and within a few tokens for BPE) or, without a tokenizer, in characters
(= tokens of the char tokenizer). The chat template adds a few marker tokens on top. Each row
carries `length` and `depth` (the nominal cell) and `n_tokens` (measured prompt length) so an
eval can report accuracy per (length, depth) cell.

Files written by `write`:

    sft_train.jsonl, sft_eval.jsonl   prompt_completion + length, depth, n_tokens
    rl_train.jsonl,  rl_eval.jsonl    rl (prompt + answer) + length, depth, n_tokens
    task.json                         the parameters used

Train rows draw `length` from `lengths` and `depth` uniformly from [0, 1] (rounded to 3
decimals); eval rows cover the grid eval_lengths x depths with `n_eval_per_cell` rows per cell
(`eval_lengths` defaults to `lengths`; longer ones test length generalisation).
"""
from __future__ import annotations

import os
import random
import string
from pathlib import Path
from collections import defaultdict
from typing import Any, Callable, Sequence

from posttrain.data.io import write_json_atomic, write_jsonl_atomic

NAME = "needle"
FILLERS = ("kv", "text")
_WORDS = (
    "the a one small old new red blue green cat dog bird fish tree house river hill road "
    "sees finds likes takes makes keeps near over under with from into and but then"
).split()


def _key(rng: random.Random, chars: int = 4) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=chars))


def _value(rng: random.Random, digits: int = 4) -> str:
    return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1))


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(4, 8))) + ".\n"


def make_example(
    rng: random.Random,
    length: int,
    depth: float,
    *,
    filler: str = "kv",
    count: Callable[[str], int] = len,
    key_chars: int = 4,
    value_digits: int = 4,
) -> tuple[str, str, int]:
    """One (prompt, answer, n_tokens) with the needle at `depth` in ~`length` tokens."""
    key, answer = _key(rng, key_chars), _value(rng, value_digits)
    needle = f"{key}={answer}\n"
    question = f"Q: {key}"
    used = {key}
    budget = length - count(needle) - count(question)
    lines: list[str] = []
    while True:
        if filler == "kv":
            if len(used) == 26**key_chars:  # write() rules this out; never loop forever
                break
            k = _key(rng, key_chars)
            if k in used:
                continue
            line = f"{k}={_value(rng, value_digits)}\n"
        else:
            line = _sentence(rng)
        n = count(line)
        if n > budget:
            break
        if filler == "kv":
            used.add(k)
        lines.append(line)
        budget -= n
    lines.insert(round(depth * len(lines)), needle)
    prompt = "".join(lines) + question
    return prompt, answer, length - budget


def _rows(rng: random.Random, cells: Sequence[tuple[int, float]], count, **knobs) -> list[dict]:
    rows = []
    for length, depth in cells:
        prompt, answer, n_tokens = make_example(rng, length, depth, count=count, **knobs)
        rows.append({"prompt": prompt, "answer": answer, "length": length, "depth": depth, "n_tokens": n_tokens})
    return rows


def _as_sft(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["answer"], **{k: r[k] for k in ("length", "depth", "n_tokens")}} for r in rows]


def write(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 2000,
    n_eval_per_cell: int = 20,
    seed: int = 0,
    lengths: Sequence[int] = (128, 256, 512),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    filler: str = "kv",
    tokenizer=None,
    n_rl_train: int | None = None,
    key_chars: int = 4,
    value_digits: int = 4,
    eval_lengths: Sequence[int] | None = None,
) -> dict[str, Path]:
    """Write the needle datasets into out_dir; returns {name: path} (see module docstring)."""
    if filler not in FILLERS:
        raise ValueError(f"needle filler must be one of {FILLERS}, got {filler!r}")
    eval_lengths = list(lengths if eval_lengths is None else eval_lengths)
    for name, ls in (("lengths", lengths), ("eval_lengths", eval_lengths)):
        if not ls or min(ls) < 32:
            raise ValueError(f"needle {name} must be non-empty and >= 32 tokens, got {list(ls)}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must be fractions in [0, 1], got {list(depths)}")
    if not 1 <= key_chars <= 8 or not 1 <= value_digits <= 9:
        raise ValueError(f"needle key_chars must be in [1, 8] and value_digits in [1, 9], got {key_chars}, {value_digits}")
    longest = max(*lengths, *eval_lengths)
    max_lines = longest // (key_chars + value_digits + 2) + 1  # "key=value\n" is >= 1 token per char
    if filler == "kv" and tokenizer is None and max_lines > 26**key_chars:
        raise ValueError(f"needle filler 'kv': a {longest}-token context has up to {max_lines} lines but "
                         f"key_chars={key_chars} gives only {26**key_chars} distinct keys; raise key_chars")
    count = len if tokenizer is None else (lambda s: len(tokenizer.encode(s, add_special_tokens=False)))
    n_rl_train = n_train if n_rl_train is None else n_rl_train

    def rng(split: str) -> random.Random:
        return random.Random(f"{NAME}/{seed}/{split}")

    def train_cells(r: random.Random, n: int) -> list[tuple[int, float]]:
        return [(r.choice(list(lengths)), round(r.random(), 3)) for _ in range(n)]

    grid = [(L, float(d)) for L in eval_lengths for d in depths for _ in range(n_eval_per_cell)]
    r_sft, r_rl = rng("sft_train"), rng("rl_train")
    knobs = dict(filler=filler, key_chars=key_chars, value_digits=value_digits)
    sft_train = _rows(r_sft, train_cells(r_sft, n_train), count, **knobs)
    rl_train = _rows(r_rl, train_cells(r_rl, n_rl_train), count, **knobs)
    eval_rows = _rows(rng("eval"), grid, count, **knobs)

    out = Path(out_dir)
    params = dict(task=NAME, n_train=n_train, n_eval_per_cell=n_eval_per_cell, seed=seed, lengths=list(lengths),
                  depths=[float(d) for d in depths], filler=filler, n_rl_train=n_rl_train,
                  key_chars=key_chars, value_digits=value_digits, eval_lengths=eval_lengths,
                  length_unit="characters" if tokenizer is None else f"tokens of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}")
    return {
        "sft_train": write_jsonl_atomic(out / "sft_train.jsonl", _as_sft(sft_train)),
        "sft_eval": write_jsonl_atomic(out / "sft_eval.jsonl", _as_sft(eval_rows)),
        "rl_train": write_jsonl_atomic(out / "rl_train.jsonl", rl_train),
        "rl_eval": write_jsonl_atomic(out / "rl_eval.jsonl", eval_rows),
        "task": write_json_atomic(out / "task.json", params),
    }


def check(completion_text: str, answer: str) -> bool:
    """Exact match of the retrieved value after stripping surrounding whitespace."""
    return completion_text.strip() == answer.strip()


# ------------------------------------------------------------------ held-out cells
def has_cells(records: Sequence[Any]) -> bool:
    """True when every record carries numeric `length` and `depth` metadata."""
    return bool(records) and all(
        isinstance(getattr(r, "meta", {}).get("length"), (int, float))
        and isinstance(getattr(r, "meta", {}).get("depth"), (int, float))
        for r in records
    )


def cell_accuracy(lengths: Sequence[float], depths: Sequence[float], hits: Sequence[bool]) -> list[dict[str, Any]]:
    """Accuracy per (length, depth) cell, sorted by length then depth."""
    if not len(lengths) == len(depths) == len(hits):
        raise ValueError(f"cell_accuracy: {len(lengths)} lengths, {len(depths)} depths, {len(hits)} hits")
    groups: dict[tuple[float, float], list[bool]] = defaultdict(list)
    for length, depth, hit in zip(lengths, depths, hits):
        groups[(length, depth)].append(bool(hit))
    return [{"length": length, "depth": depth, "accuracy": sum(h) / len(h), "n": len(h)}
            for (length, depth), h in sorted(groups.items())]


def plot_cells(cells: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Heatmap PNG of cell accuracies: x = context length, y = needle depth (0 = top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(int(x)) if float(x).is_integer() else str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def per_cell_limit(records: list[Any], limit: int) -> list[Any]:
    """At most ceil(limit / n_cells) rows of each cell, in file order."""
    keys = {(r.meta["length"], r.meta["depth"]) for r in records}
    per_cell = max(1, -(-limit // len(keys)))
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    for r in records:
        key = (r.meta["length"], r.meta["depth"])
        if seen[key] < per_cell:
            seen[key] += 1
            out.append(r)
    return out
