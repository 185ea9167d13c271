"""Small Python functions with hidden tests: the `code` reward's task (posttrain.rollout).

A problem asks for one function, e.g. prompt "Write a Python function f(x) that returns x
plus 7.", and its hidden tests are asserts on that function, one per line, in the row's
`answer` (never shown to the model); the `code` reward runs a completion's program against
them in the sandbox and scores the fraction passed. Each family is a template with a random
constant (`plus 7`, `times 3`, ...), so problems differ by more than their wording.

Files written by `write` (jsonl, loadable with posttrain.data.load_records):

    sft_train.jsonl, sft_eval.jsonl   prompt_completion: a reference solution as completion
    rl_train.jsonl,  rl_eval.jsonl    rl: prompt + answer (the hidden tests, one per line)
    task.json                         the parameters used

Eval problems never appear in a train file (checked by prompt). Output is a pure function
of the arguments. An answer is judged by running it (the `code` reward), not by comparing
strings, so `check` is None and the eval uses the reward named by REWARD.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

from posttrain.data.io import write_json_atomic, write_jsonl_atomic

NAME = "coding"
REWARD = "code"  # the posttrain.rollout reward that judges an answer

# (task text with {k}, reference body with {k}, the function computed, inputs to test)
Family = tuple[str, str, Callable[[int, int], int], tuple[int, ...]]
FAMILIES: list[Family] = [
    ("returns x plus {k}", "return x + {k}", lambda x, k: x + k, (0, 1, -3, 10, 99)),
    ("returns x minus {k}", "return x - {k}", lambda x, k: x - k, (0, 5, -2, 40)),
    ("returns x times {k}", "return x * {k}", lambda x, k: x * k, (0, 1, -4, 7)),
    ("returns the remainder of x divided by {k}", "return x % {k}", lambda x, k: x % k, (0, 9, 23, 100)),
    ("returns the larger of x and {k}", "return max(x, {k})", lambda x, k: max(x, k), (-5, 0, 6, 50)),
    ("returns 1 if x is greater than {k}, else 0", "return int(x > {k})", lambda x, k: int(x > k), (-1, 3, 8, 12)),
]


def make_problem(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, reference solution, hidden tests) of one random problem."""
    text, body, fn, inputs = FAMILIES[rng.randrange(len(FAMILIES))]
    k = rng.randint(2, 9)
    prompt = f"Write a Python function f(x) that {text.format(k=k)}.\n"
    solution = f"def f(x):\n    {body.format(k=k)}\n"
    tests = "\n".join(f"assert f({x}) == {fn(x, k)}" for x in inputs)
    return prompt, solution, tests


def write(out_dir: str | os.PathLike, *, n_train: int = 2000, n_eval: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write the coding datasets into out_dir; returns {name: path} (see module docstring)."""
    space = sum(8 for _ in FAMILIES)  # k in 2..9 per family
    if not 1 <= n_eval <= space // 2:
        raise ValueError(f"coding: n_eval={n_eval} must be in [1, {space // 2}] ({space} distinct problems)")
    rng = random.Random(f"{NAME}/{seed}")
    eval_rows: dict[str, tuple[str, str, str]] = {}
    while len(eval_rows) < n_eval:
        p = make_problem(rng)
        eval_rows.setdefault(p[0], p)
    train = []
    while len(train) < n_train:
        p = make_problem(rng)
        if p[0] not in eval_rows:
            train.append(p)
    held = list(eval_rows.values())
    out = Path(out_dir)
    return {
        "sft_train": write_jsonl_atomic(out / "sft_train.jsonl", [{"prompt": p, "completion": s} for p, s, _ in train]),
        "sft_eval": write_jsonl_atomic(out / "sft_eval.jsonl", [{"prompt": p, "completion": s} for p, s, _ in held]),
        "rl_train": write_jsonl_atomic(out / "rl_train.jsonl", [{"prompt": p, "answer": t} for p, _, t in train]),
        "rl_eval": write_jsonl_atomic(out / "rl_eval.jsonl", [{"prompt": p, "answer": t} for p, _, t in held]),
        "task": write_json_atomic(out / "task.json", dict(task=NAME, n_train=n_train, n_eval=n_eval, seed=seed)),
    }
