"""Built-in rewards, user rewards by 'module:function', and the runner's failure handling."""
import textwrap
import time

import pytest

from posttrain.rollout.rewards import (
    digit_match,
    REWARDS,
    RewardConfig,
    RewardRunner,
    parse_last_number,
    resolve_reward,
)


def test_exact_match():
    f = REWARDS["exact_match"]
    assert f("  42\n", "42") == 1.0
    assert f("42.", "42") == 0.0


@pytest.mark.parametrize(
    "text,expected",
    [("the answer is 1,234.5", 1234.5), ("x = -3 then 7/2", 3.5), ("2e-3", 0.002), ("none", None)],
)
def test_parse_last_number(text, expected):
    assert parse_last_number(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("42", "42", 1.0), (" 42 ", "42", 1.0),
    ("43", "42", 0.25),  # tens digit right: 1 of 2 positions
    ("142", "42", 0.5 * 2 / 3),  # an extra leading digit costs a position
    ("-4", "-6", 0.25), ("24", "42", 0.0), ("", "42", 0.0), ("", "", 1.0),
])
def test_digit_match_partial_credit(pred, gold, expected):
    assert digit_match(pred, gold) == pytest.approx(expected)


def test_digit_match_orders_answers_and_never_rivals_exact():
    gold = "-137"
    answers = ["-137", "-136", "-126", "-026", "999", "x"]
    scores = [digit_match(a, gold) for a in answers]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    assert max(scores[1:]) < 0.5 and digit_match("-136", gold, partial=0.2) == pytest.approx(0.15)


def test_numeric_tolerance():
    f = REWARDS["numeric"]
    assert f("so we get 0.3333334", "1/3", rel_tol=1e-5) == 1.0
    assert f("so we get 0.34", "1/3", rel_tol=1e-5) == 0.0
    assert f("no number here", "3") == 0.0


def test_math_verify_equivalence():
    f = REWARDS["math"]
    assert f("Therefore the answer is $\\boxed{\\frac{1}{2}}$.", "0.5") == 1.0
    assert f("Therefore the answer is $\\boxed{\\frac{1}{3}}$.", "0.5") == 0.0
    assert f("we get \\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0


def test_format_reward():
    f = REWARDS["format"]
    assert f("<think>reason</think> 42", "") == 1.0
    assert f("42 <think>reason</think>", "") == 0.0
    assert f("<think>reason</think>   ", "") == 0.0


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        import time
        def length_bonus(completion_text, reference, **meta):
            return len(completion_text) * meta.get("scale", 1.0)
        def boom(completion_text, reference, **meta):
            if completion_text == "bad":
                raise RuntimeError("bad input")
            return 1.0
        def slow(completion_text, reference, **meta):
            if completion_text == "hang":
                time.sleep(30)
            return 1.0
        def die(completion_text, reference, **meta):
            if completion_text == "die":
                import os
                os._exit(3)
            return 1.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_user_reward_resolved_by_import(user_module):
    fn = resolve_reward(f"{user_module}:length_bonus")
    runner = RewardRunner(RewardConfig(fn=f"{user_module}:length_bonus"))
    rewards, metrics = runner.score(["ab", "abcd"], ["", ""], [{"scale": 0.5}, {}])
    assert fn("abc", "") == 3.0
    assert rewards == [1.0, 4.0]
    assert metrics["reward/errors"] == 0.0 and metrics["reward/mean"] == 2.5


def test_unknown_reward_names_problem():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="no callable 'missing'"):
        resolve_reward("posttrain.rollout.rewards:missing")


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_raising_reward_gives_fallback_and_is_counted(user_module, executor):
    cfg = RewardConfig(fn=f"{user_module}:boom", fallback=-1.0, executor=executor, num_workers=2)
    runner = RewardRunner(cfg)
    rewards, metrics = runner.score(["ok", "bad", "ok", "bad"], ["x"] * 4)
    assert rewards == [1.0, -1.0, 1.0, -1.0]
    assert metrics["reward/errors"] == 2.0 and metrics["reward/timeouts"] == 0.0
    assert runner.total_errors == 2


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_timeout_gives_fallback_and_is_counted(user_module, executor):
    cfg = RewardConfig(fn=f"{user_module}:slow", timeout_s=0.3, fallback=-2.0, executor=executor, num_workers=1)
    runner = RewardRunner(cfg)
    start = time.monotonic()
    # One worker: the call queued behind the hung one must still run (its timeout starts at its start).
    rewards, metrics = runner.score(["hang", "fine", "fine"], ["x"] * 3)
    assert rewards == [-2.0, 1.0, 1.0]
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 0.0
    assert time.monotonic() - start < 5.0


def test_a_reward_process_that_dies_gives_fallback_and_is_counted(user_module):
    """The runner waits on the children's pipes: a child that exits without an answer reads
    as end-of-file, so the batch finishes at once instead of waiting for the timeout."""
    runner = RewardRunner(RewardConfig(fn=f"{user_module}:die", fallback=-1.0, executor="process",
                                       num_workers=2, timeout_s=20.0))
    start = time.monotonic()
    rewards, metrics = runner.score(["ok", "die", "ok"], ["x"] * 3)
    assert rewards == [1.0, -1.0, 1.0]
    assert metrics["reward/errors"] == 1.0 and metrics["reward/timeouts"] == 0.0
    assert time.monotonic() - start < 10.0
