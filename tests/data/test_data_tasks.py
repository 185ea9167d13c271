"""Synthetic tasks: determinism, atomic idempotent writes, correct answers, check()."""
import json
import re

import pytest

from posttrain.data import TASKS, build_tokenizer, encode_sft, load_records, write_task
from posttrain.data.tasks import arithmetic, needle


def read_bytes(files):
    return {k: p.read_bytes() for k, p in files.items()}


def test_registry():
    assert set(TASKS) == {"arithmetic", "coding", "needle"}
    for name, task in TASKS.items():
        # an answer is checked by a function, or (coding: by running it) by a reward
        assert task.name == name and callable(task.write) and (callable(task.check) or task.reward)
    with pytest.raises(KeyError, match="available: arithmetic, coding, needle"):
        write_task("sorting", "/tmp/unused")


def test_arithmetic_deterministic_idempotent_atomic(tmp_path):
    kw = dict(n_train=300, n_eval=50, n_prompts=40, seed=3)
    a = write_task("arithmetic", tmp_path / "a", **kw)
    b = write_task("arithmetic", tmp_path / "b", **kw)
    assert set(a) == {"sft_train", "sft_eval", "rl_train", "rl_eval", "prompts", "task"}
    assert read_bytes(a) == {k: v for k, v in read_bytes(b).items()}
    again = write_task("arithmetic", tmp_path / "a", **kw)
    assert read_bytes(again) == read_bytes(a)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in a.values())  # no temp files
    other = write_task("arithmetic", tmp_path / "c", **{**kw, "seed": 4})
    assert read_bytes(other)["sft_train"] != read_bytes(a)["sft_train"]


PROBLEM = re.compile(r"^(\d+)([+\-*])(\d+)=$")


@pytest.mark.parametrize("knobs", [dict(), dict(min_digits=4, max_digits=4, ops=("+", "-", "*")), dict(min_digits=1, max_digits=1)])
def test_arithmetic_answers_correct_and_eval_held_out(tmp_path, knobs):
    # 1-digit + and - has only 200 distinct problems: train still draws 400 (with repeats)
    files = arithmetic.write(tmp_path, n_train=400, n_eval=60, n_prompts=30, seed=0, **knobs)
    lo, hi = knobs.get("min_digits", 2), knobs.get("max_digits", 3)
    sft = load_records(files["sft_train"], "prompt_completion").records
    rl_eval = load_records(files["rl_eval"], "rl").records
    for prompt, answer in [(r.prompt, r.completion) for r in sft] + [(r.prompt, r.answer) for r in rl_eval]:
        a, op, b = PROBLEM.match(prompt).groups()
        assert lo <= len(a) <= hi and lo <= len(b) <= hi and op in knobs.get("ops", ("+", "-"))
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    train_prompts = {r.prompt for r in sft}
    train_prompts |= {r.prompt for r in load_records(files["rl_train"], "rl").records}
    train_prompts |= {r.prompt for r in load_records(files["prompts"], "rl").records}
    assert not train_prompts & {r.prompt for r in rl_eval}
    assert len({r.prompt for r in rl_eval}) == len(rl_eval) == 60
    assert len(sft) == 400


def test_arithmetic_sequences_are_short_and_round_trip(tmp_path):
    tok = build_tokenizer("char")
    files = arithmetic.write(tmp_path, n_train=200, n_eval=10, n_prompts=10, min_digits=2, max_digits=4)
    for rec in load_records(files["sft_train"], "prompt_completion").records:
        ex = encode_sft(rec, tok, max_len=64)
        assert 12 <= len(ex) <= 24
        assert tok.decode(ex.input_ids, skip_special_tokens=True) == rec.prompt + rec.completion


def test_arithmetic_rejects_impossible_requests(tmp_path):
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        arithmetic.write(tmp_path, n_train=10, n_eval=60, min_digits=1, max_digits=1, ops=("+",))
    with pytest.raises(ValueError, match="ops"):
        arithmetic.write(tmp_path, ops=("/",))


@pytest.mark.parametrize("check", [arithmetic.check, needle.check])
def test_check(check):
    assert check("579", "579") and check("  579\n", "579") and check("-333", " -333")
    assert not check("0579", "579") and not check("57", "579") and not check("", "579")
    assert not check("579.", "579") and not check("5 79", "579")


def context_lines(prompt):
    body, question = prompt.rsplit("\n", 1)
    assert question.startswith("Q: ")
    return body.split("\n"), question[3:]


def test_needle_grid_needle_position_and_lengths(tmp_path):
    lengths, depths = (64, 160), (0.0, 0.5, 1.0)
    files = write_task("needle", tmp_path, n_train=30, n_eval_per_cell=4, seed=1, lengths=lengths, depths=depths)
    rows = load_records(files["rl_eval"], "rl").records
    cells = {}
    for r in rows:
        cells[(r.meta["length"], r.meta["depth"])] = cells.get((r.meta["length"], r.meta["depth"]), 0) + 1
        lines, key = context_lines(r.prompt)
        pairs = [ln.split("=") for ln in lines]
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == len(keys)  # the lookup is unambiguous
        idx = keys.index(key)
        assert pairs[idx][1] == r.answer
        assert abs(idx - r.meta["depth"] * (len(lines) - 1)) <= 1
        assert r.meta["n_tokens"] == len(r.prompt)  # char counting: one token per char
        assert r.meta["length"] - 10 < r.meta["n_tokens"] <= r.meta["length"]
    assert cells == {(L, d): 4 for L in lengths for d in depths}
    sft_eval = load_records(files["sft_eval"], "prompt_completion").records
    assert [(r.prompt, r.completion) for r in sft_eval] == [(r.prompt, r.answer) for r in rows]
    train = load_records(files["sft_train"], "prompt_completion").records
    assert len(train) == 30 and all(0.0 <= r.meta["depth"] <= 1.0 and r.meta["length"] in lengths for r in train)


def test_needle_text_filler_and_tokenizer_lengths(tmp_path):
    tok = build_tokenizer("char")
    files = needle.write(tmp_path, n_train=5, n_eval_per_cell=3, lengths=(200,), depths=(0.25,), filler="text", tokenizer=tok)
    for r in load_records(files["rl_eval"], "rl").records:
        lines, key = context_lines(r.prompt)
        assert [ln for ln in lines if "=" in ln] == [f"{key}={r.answer}"]
        assert len(tok.encode(r.prompt, add_special_tokens=False)) == r.meta["n_tokens"] <= 200
    assert json.loads(files["task"].read_text())["filler"] == "text"


def test_needle_deterministic(tmp_path):
    kw = dict(n_train=20, n_eval_per_cell=2, lengths=(64,), seed=5)
    a, b = needle.write(tmp_path / "a", **kw), needle.write(tmp_path / "b", **kw)
    assert read_bytes(a) == read_bytes(b)
    assert read_bytes(needle.write(tmp_path / "c", **{**kw, "seed": 6}))["rl_eval"] != read_bytes(a)["rl_eval"]


@pytest.mark.parametrize("filler", ["kv", "text"])
def test_needle_short_keys_and_values(tmp_path, filler):
    # the easy setting for tiny models: 2-letter keys, one-digit values (0-9)
    files = needle.write(tmp_path, n_train=40, n_eval_per_cell=6, lengths=(128, 512), depths=(0.0, 1.0),
                         filler=filler, key_chars=2, value_digits=1)
    rows = load_records(files["rl_eval"], "rl").records + load_records(files["rl_train"], "rl").records
    answers = set()
    for r in rows:
        lines, key = context_lines(r.prompt)
        pairs = [ln.split("=") for ln in lines if "=" in ln]
        keys = [k for k, _ in pairs]
        assert len(key) == 2 and key.isalpha() and len(r.answer) == 1 and r.answer.isdigit()
        assert len(set(keys)) == len(keys) and dict(pairs)[key] == r.answer  # unambiguous lookup
        if filler == "kv":
            assert len(pairs) == len(lines) and all(len(k) == 2 and len(v) == 1 for k, v in pairs)
        else:
            assert pairs == [[key, r.answer]]
        slack = 6 if filler == "kv" else 60  # at most one filler line short of the length
        assert r.meta["length"] - slack < r.meta["n_tokens"] <= r.meta["length"]
        answers.add(r.answer)
    assert answers == set("0123456789")  # 0 is a value too
    task = json.loads(files["task"].read_text())
    assert (task["key_chars"], task["value_digits"]) == (2, 1)


def test_needle_defaults_unchanged_by_knobs(tmp_path):
    kw = dict(n_train=10, n_eval_per_cell=2, lengths=(96,), seed=2)
    default = read_bytes(needle.write(tmp_path / "a", **kw))
    explicit = read_bytes(needle.write(tmp_path / "b", **kw, key_chars=4, value_digits=4))
    assert default == explicit
    for r in load_records(tmp_path / "a" / "rl_eval.jsonl", "rl").records:
        assert len(r.answer) == 4 and len(context_lines(r.prompt)[1]) == 4


def test_needle_rejects_too_few_distinct_keys(tmp_path):
    # one-letter keys: 26 distinct keys cannot fill a 512-token kv context without repeats
    with pytest.raises(ValueError, match="key_chars=1 gives only 26 distinct keys"):
        needle.write(tmp_path, lengths=(512,), filler="kv", key_chars=1, value_digits=1)
    with pytest.raises(ValueError, match="value_digits"):
        needle.write(tmp_path, lengths=(64,), value_digits=0)
    files = needle.write(tmp_path, n_train=4, n_eval_per_cell=1, lengths=(512,), filler="text", key_chars=1, value_digits=1)
    assert files["task"].is_file()  # the text filler has one key only


def test_needle_eval_lengths_differ_from_train_lengths(tmp_path):
    # train short, evaluate long (length generalisation); the train split ignores eval_lengths
    files = needle.write(tmp_path, n_train=30, n_eval_per_cell=2, lengths=(32, 48), eval_lengths=(64, 300),
                         depths=(0.0, 1.0), filler="text", key_chars=2, value_digits=1)
    train = load_records(files["sft_train"], "prompt_completion").records
    ev = load_records(files["rl_eval"], "rl").records
    assert {r.meta["length"] for r in train} == {32, 48} and all(r.meta["n_tokens"] <= 48 for r in train)
    assert sorted({(r.meta["length"], r.meta["depth"]) for r in ev}) == [(64, 0.0), (64, 1.0), (300, 0.0), (300, 1.0)]
    assert max(r.meta["n_tokens"] for r in ev) > 240
    assert json.loads(files["task"].read_text())["eval_lengths"] == [64, 300]
    with pytest.raises(ValueError, match="eval_lengths must be non-empty and >= 32"):
        needle.write(tmp_path, lengths=(64,), eval_lengths=(16,))
