"""Multi-digit arithmetic with an exactly checkable answer.

A problem is "a<op>b=" with op in `ops` ("+", "-", "*") and each operand drawn with a digit
count uniform in [min_digits, max_digits] (leading digit non-zero, except 1-digit operands
which include 0); the completion is the exact integer result, e.g. prompt "123-456=",
completion "-333". With the char tokenizer a 4-digit problem is ~20 tokens after templating.

Difficulty knobs: `min_digits`/`max_digits` (carries grow with digits), `ops` ("-" adds
borrows and signs, "*" is much harder for tiny models). The defaults (2-3 digits, + and -)
are a starting point for a ~3-5M parameter model trained a few CPU minutes, meant to land
clearly above chance and below 100%; they are not calibrated yet, tune with the knobs.

Files written by `write` (all jsonl, loadable with posttrain.data.load_records):

    sft_train.jsonl, sft_eval.jsonl   prompt_completion (+ "op")
    rl_train.jsonl,  rl_eval.jsonl    rl: prompt + answer (+ "op")
    prompts.jsonl                     rl format too: prompts for DPO pair generation (sample
                                      several completions, label them with `check`)
    task.json                         the parameters used

Eval problems are distinct and never appear in any train file (checked by prompt). Output
is a pure function of the arguments (random.Random seeded per split from `seed`).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

from posttrain.data.io import write_json_atomic, write_jsonl_atomic

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


def _sample_distinct(rng: random.Random, n: int, knobs: tuple) -> list[tuple[str, str, str]]:
    """n problems with distinct prompts (rejection sampling; the caller checks the space)."""
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        p = make_problem(rng, *knobs)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def _sample_iid(rng: random.Random, n: int, exclude: set[str], knobs: tuple) -> list[tuple[str, str, str]]:
    """n i.i.d. problems from the distribution restricted to prompts outside `exclude`."""
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        p = make_problem(rng, *knobs)
        if p[0] not in exclude:
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

    n_rl_train defaults to n_train. Eval problems are distinct; SFT train, RL train and
    prompts are independent i.i.d. draws of the same distribution minus the eval problems
    (so they may repeat problems, which only matters for tiny spaces such as 1-digit).
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(OPS)}, got {list(ops)}")
    n_rl_train = n_train if n_rl_train is None else n_rl_train
    knobs = (min_digits, max_digits, tuple(ops))
    space = _space_size(min_digits, max_digits, len(set(ops)))
    if n_eval > space // 2:
        # Held-out problems must leave most of the space (and of its probability) to training.
        raise ValueError(f"arithmetic: only {space} distinct problems with {knobs}; n_eval={n_eval} must be <= {space // 2}")

    def rng(split: str) -> random.Random:
        return random.Random(f"{NAME}/{seed}/{split}")

    eval_set = _sample_distinct(rng("eval"), n_eval, knobs)
    held_out = {p for p, _, _ in eval_set}
    train = _sample_iid(rng("sft_train"), n_train, held_out, knobs)
    rl_train = _sample_iid(rng("rl_train"), n_rl_train, held_out, knobs)
    prompts = _sample_iid(rng("prompts"), n_prompts, held_out, knobs)

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
