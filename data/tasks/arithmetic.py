"""Multi-digit arithmetic with an exactly checkable answer.

A problem is "a<op>b=" with op in `ops` ("+", "-", "*") and each operand drawn with a digit
count uniform in [min_digits, max_digits] (leading digit non-zero, except 1-digit operands
which include 0); the completion is the exact integer result, e.g. prompt "123-456=",
completion "-333". With the char tokenizer a 4-digit problem is ~20 tokens after templating.

Difficulty knobs: `min_digits`/`max_digits` (carries grow with digits), `ops` ("-" adds
borrows and signs, "*" is much harder for tiny models). Defaults (2-3 digits, + and -) are
meant to leave a ~3-5M parameter model trained a few CPU minutes clearly above chance
(chance is ~0.1-1% exact match) but well below 100%.

Files written by `write` (all jsonl, loadable with posttrain.data.load_records):

    sft_train.jsonl, sft_eval.jsonl   prompt_completion (+ "op")
    rl_train.jsonl,  rl_eval.jsonl    rl: prompt + answer (+ "op")
    prompts.jsonl                     rl format too: prompts for DPO pair generation (sample
                                      several completions, label them with `check`)
    task.json                         the parameters used

Eval problems never appear in any train file (checked by prompt). Output is a pure function
of the arguments (random.Random seeded per split from `seed`).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

from posttrain.data.tasks._io import write_json_atomic, write_jsonl_atomic

NAME = "arithmetic"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    d = rng.randint(min_digits, max_digits)
    lo = 0 if d == 1 else 10 ** (d - 1)
    return rng.randint(lo, 10**d - 1)


def make_problem(rng: random.Random, min_digits: int, max_digits: int, ops: Sequence[str]) -> tuple[str, str, str]:
    """One (prompt, answer, op) triple, e.g. ("123+456=", "579", "+")."""
    op = rng.choice(list(ops))
    a, b = _operand(rng, min_digits, max_digits), _operand(rng, min_digits, max_digits)
    return f"{a}{op}{b}=", str(OPS[op](a, b)), op


def _space_size(min_digits: int, max_digits: int, n_ops: int) -> int:
    per_operand = sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1))
    return per_operand * per_operand * n_ops


def _sample(rng: random.Random, n: int, exclude: set[str], knobs: tuple) -> list[tuple[str, str, str]]:
    """n distinct problems whose prompts are not in `exclude` (rejection sampling)."""
    out: list[tuple[str, str, str]] = []
    seen = set(exclude)
    budget = 50 * n + 1000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"arithmetic: cannot draw {n} distinct problems with {knobs}; widen the digit range or ops")
        p = make_problem(rng, *knobs)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def write(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 20000,
    n_eval: int = 500,
    seed: int = 0,
    min_digits: int = 2,
    max_digits: int = 3,
    ops: Sequence[str] = ("+", "-"),
    n_rl_train: int | None = None,
    n_prompts: int = 1000,
) -> dict[str, Path]:
    """Write the arithmetic datasets into out_dir; returns {name: path} (see module docstring).

    n_rl_train defaults to n_train. SFT train, RL train and prompts are independent draws
    (they may share problems); eval problems are disjoint from all of them.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(OPS)}, got {list(ops)}")
    n_rl_train = n_train if n_rl_train is None else n_rl_train
    knobs = (min_digits, max_digits, tuple(ops))
    space = _space_size(min_digits, max_digits, len(set(ops)))
    if n_eval + max(n_train, n_rl_train, n_prompts) > space:
        raise ValueError(f"arithmetic: only {space} distinct problems with {knobs}, asked for eval {n_eval} + train {max(n_train, n_rl_train, n_prompts)}")

    def rng(split: str) -> random.Random:
        return random.Random(f"{NAME}/{seed}/{split}")

    eval_set = _sample(rng("eval"), n_eval, set(), knobs)
    held_out = {p for p, _, _ in eval_set}
    train = _sample(rng("sft_train"), n_train, held_out, knobs)
    rl_train = _sample(rng("rl_train"), n_rl_train, held_out, knobs)
    prompts = _sample(rng("prompts"), n_prompts, held_out, knobs)

    def sft(rows):
        return [{"prompt": p, "completion": a, "op": op} for p, a, op in rows]

    def rl(rows):
        return [{"prompt": p, "answer": a, "op": op} for p, a, op in rows]

    out = Path(out_dir)
    params = dict(task=NAME, n_train=n_train, n_eval=n_eval, seed=seed, min_digits=min_digits,
                  max_digits=max_digits, ops=list(ops), n_rl_train=n_rl_train, n_prompts=n_prompts)
    return {
        "sft_train": write_jsonl_atomic(out / "sft_train.jsonl", sft(train)),
        "sft_eval": write_jsonl_atomic(out / "sft_eval.jsonl", sft(eval_set)),
        "rl_train": write_jsonl_atomic(out / "rl_train.jsonl", rl(rl_train)),
        "rl_eval": write_jsonl_atomic(out / "rl_eval.jsonl", rl(eval_set)),
        "prompts": write_jsonl_atomic(out / "prompts.jsonl", rl(prompts)),
        "task": write_json_atomic(out / "task.json", params),
    }


def check(completion_text: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace ("579 " matches "579"; "0579" does not)."""
    return completion_text.strip() == answer.strip()
