"""Reward functions and a runner that scores a batch with per-call timeouts.

A reward is any callable `(completion_text, reference, **meta) -> float`. Built-ins live in the
`REWARDS` mapping (`code` runs a completion's program against hidden tests in the sandbox of
posttrain.rollout.sandbox); anything else is named as "package.module:function" and imported.

RewardRunner isolation (the `executor` knob):
- "thread": each call runs in its own daemon thread, at most `num_workers` at once. A call that
  exceeds `timeout_s` is abandoned (Python cannot kill a thread): it stops counting towards
  the concurrency limit and its result is ignored, but it keeps running in the background.
  Right for fast pure-Python rewards (string matching, math-verify).
- "process": each call runs in a forked child process that is killed on timeout. Costs a fork
  per call (a few ms) but a hung or crashing reward cannot leak; right for untrusted/user code.
Either way a reward that raises or times out yields `fallback`, is logged, and is counted in the
metrics (reward/errors, reward/timeouts); the run continues.
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Protocol, Sequence

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, completion_text: str, reference: str, **meta: Any) -> float:
        ...


# ----------------------------------------------------------------------------- built-in rewards

def exact_match(completion_text: str, reference: str, **meta: Any) -> float:
    """1.0 when the completion equals the reference after stripping surrounding whitespace."""
    return float(completion_text.strip() == reference.strip())


def parse_last_number(text: str) -> Optional[float]:
    """The last number written in `text` ("1,234.5", "-3", "2e-3", "7/2"), or None."""
    candidates: list[float] = []
    for match in re.finditer(r"(?P<num>[-+]?[\d,]*\.?\d+(?:[eE][-+]?\d+)?)(?:\s*/\s*(?P<den>\d+))?", text):
        num = match.group("num").replace(",", "")
        try:
            value = float(num)
        except ValueError:
            continue
        if match.group("den"):
            den = float(match.group("den"))
            value = value / den if den != 0 else math.nan
        candidates.append(value)
    return candidates[-1] if candidates else None


def numeric(completion_text: str, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6, **meta: Any) -> float:
    """1.0 when the last number in the completion equals the reference number within tolerance."""
    pred, gold = parse_last_number(completion_text), parse_last_number(reference)
    if pred is None or gold is None or math.isnan(pred) or math.isnan(gold):
        return 0.0
    return float(math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol))


def math_reward(completion_text: str, reference: str, **meta: Any) -> float:
    """1.0 when math-verify judges the completion's answer equivalent to the reference.

    math-verify's own timeouts use signal.alarm, which only works in the main thread; they are
    disabled here and the RewardRunner's timeout applies instead.
    """
    from math_verify import parse, verify

    gold_text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    gold = parse(gold_text, parsing_timeout=None)
    pred = parse(completion_text, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))


def digit_match(completion_text: str, reference: str, *, partial: float = 0.5, **meta: Any) -> float:
    """Exact match with partial credit for a short answer such as an integer: 1.0 when the
    stripped completion equals the reference; otherwise `partial` x the fraction of positions,
    aligned from the right (units digit first), where both strings hold the same character, over
    the longer string's length. Always < `partial` unless exact, so it ranks a wrong answer
    with more right digits above one with fewer, and never ranks any wrong answer near a
    right one. A dense signal for small models whose samples are rarely exactly right."""
    pred, gold = completion_text.strip(), reference.strip()
    if pred == gold:
        return 1.0
    width = max(len(pred), len(gold))
    if width == 0:
        return 0.0
    same = sum(a == b for a, b in zip(reversed(pred), reversed(gold)))
    return partial * same / width


_THINK_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def think_format(completion_text: str, reference: str = "", **meta: Any) -> float:
    """1.0 when the completion is `<think>...</think>` followed by a non-empty answer (R1 style)."""
    return float(bool(_THINK_FORMAT.match(completion_text)))


def code(completion_text: str, reference: str, **meta: Any) -> float:
    """Execution reward: the fraction of the hidden tests (`reference`: Python statements, one
    per line, usually asserts) that the completion's program (its first fenced code block,
    else the whole text) passes, run in the sandbox (posttrain.rollout.sandbox: CPU, memory,
    file-size and process limits, no network, a throwaway directory, a wall-clock limit).
    Text that is not Python scores 0. A program that does not run to the end of its tests
    (raises at load, is killed by a limit, times out) raises SandboxError: the RewardRunner
    scores it `fallback` and counts it in reward/errors."""
    from posttrain.rollout.sandbox import SandboxError, extract_program, run_tests

    tests = [line for line in reference.splitlines() if line.strip()]
    result = run_tests(extract_program(completion_text), tests)
    if result.outcome == "ok":
        return result.passed / max(1, result.total)
    if result.outcome == "syntax_error":
        return 0.0
    raise SandboxError(f"{result.outcome}: {result.detail}")


REWARDS: dict[str, RewardFn] = {
    "code": code,
    "exact_match": exact_match,
    "digit_match": digit_match,
    "numeric": numeric,
    "math": math_reward,
    "format": think_format,
}


def resolve_callable(spec: str) -> Callable[..., Any]:
    """The callable named by 'package.module:function', imported on demand (user rewards and
    losses). Raises ValueError with one line saying what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import failure of user code is a config error
        raise ValueError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    return fn


def resolve_reward(name: str) -> RewardFn:
    """A built-in name from REWARDS, or "package.module:function" imported on demand."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: expected one of {sorted(REWARDS)} or 'module:function'")
    return resolve_callable(name)


# ----------------------------------------------------------------------------- the runner

@dataclass(frozen=True)
class RewardConfig:
    """How completions are scored (the recipe's `reward:` of rl stages and `pairs.reward:` of dpo
    stages). The function is resolved (a user module imported) when the config is built, so a
    recipe naming a missing one fails at load time. Invalid values raise ValueError("<field>: ...")."""

    fn: str = "exact_match"  # a REWARDS name or 'module:function'
    timeout_s: float = 10.0  # per call; a call past it scores `fallback` (counted)
    fallback: float = 0.0  # the score of a call that raised or timed out
    num_workers: int = 4  # concurrent reward calls
    executor: Literal["thread", "process"] = "thread"  # process: isolates calls that may hang or crash

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s: must be a finite number > 0, got {self.timeout_s}")
        if not math.isfinite(self.fallback):
            raise ValueError(f"fallback: must be a finite number, got {self.fallback}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"executor: must be 'thread' or 'process', got {self.executor!r}")
        try:
            resolve_reward(self.fn)
        except ValueError as e:
            raise ValueError(f"fn: {e}") from None


class _ThreadCall:
    """One reward call in a daemon thread. `outcome` is ("ok", value) or ("error", message);
    `done` is set once it is there (the runner waits on it instead of polling on a timer)."""

    def __init__(self, fn: Callable[..., float], args: tuple, kwargs: dict, done: threading.Event) -> None:
        self.outcome: Optional[tuple[str, Any]] = None
        self._done = done
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)

    def _run(self, fn: Callable[..., float], args: tuple, kwargs: dict) -> None:
        try:
            self.outcome = ("ok", float(fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - any failure of user code becomes a fallback
            self.outcome = ("error", f"{type(exc).__name__}: {exc}")
        finally:
            self._done.set()

    def start(self) -> None:
        self._thread.start()

    def poll(self) -> Optional[tuple[str, Any]]:
        return self.outcome

    def kill(self) -> None:
        """Threads cannot be killed: abandon it (daemon, so it never blocks interpreter exit)."""


def _child_main(conn: Any, fn: Callable[..., float], args: tuple, kwargs: dict) -> None:
    try:
        conn.send(("ok", float(fn(*args, **kwargs))))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _ProcessCall:
    """One reward call in a forked child process, killed on timeout."""

    def __init__(self, fn: Callable[..., float], args: tuple, kwargs: dict) -> None:
        ctx = mp.get_context("fork")
        self._recv, send = ctx.Pipe(duplex=False)
        self._send = send
        self._proc = ctx.Process(target=_child_main, args=(send, fn, args, kwargs), daemon=True)
        self.outcome: Optional[tuple[str, Any]] = None

    def start(self) -> None:
        self._proc.start()
        self._send.close()  # the parent keeps only the read end, so a dead child reads as EOF

    @property
    def reader(self) -> Any:
        """The pipe's read end (readable when the child sent its outcome or died)."""
        return self._recv

    def poll(self) -> Optional[tuple[str, Any]]:
        if self.outcome is None and self._recv.poll():
            try:
                self.outcome = self._recv.recv()
            except EOFError:
                self.outcome = ("error", f"reward process exited with code {self._proc.exitcode}")
            self._proc.join()
        return self.outcome

    def kill(self) -> None:
        self._proc.kill()
        self._proc.join()
        self._recv.close()


class RewardRunner:
    """Scores batches with one reward function; counts errors and timeouts across its life."""

    def __init__(self, config: RewardConfig, fn: Optional[RewardFn] = None) -> None:
        self.config = config
        self.fn: RewardFn = fn if fn is not None else resolve_reward(config.fn)
        self.total_errors = 0
        self.total_timeouts = 0

    def score(
        self,
        texts: Sequence[str],
        references: Sequence[str],
        metas: Optional[Sequence[dict[str, Any]]] = None,
    ) -> tuple[list[float], dict[str, float]]:
        """Score texts[i] against references[i] (with **metas[i]).

        Returns (rewards, metrics) where metrics has reward/errors and reward/timeouts (counts in
        this batch) and reward/mean (over all rewards, fallbacks included).
        """
        if len(texts) != len(references) or (metas is not None and len(metas) != len(texts)):
            raise ValueError(
                f"RewardRunner.score: {len(texts)} texts, {len(references)} references, "
                f"{'no' if metas is None else len(metas)} metas — lengths must match"
            )
        done = threading.Event()  # set by thread calls as they finish; process calls have their pipes

        def call(args: tuple, kwargs: dict) -> Any:
            if self.config.executor == "thread":
                return _ThreadCall(self.fn, args, kwargs, done)
            return _ProcessCall(self.fn, args, kwargs)

        calls = [call((t, r), dict(metas[i]) if metas is not None else {})
                 for i, (t, r) in enumerate(zip(texts, references))]
        rewards, errors, timeouts = self._run_all(calls, done)
        self.total_errors += errors
        self.total_timeouts += timeouts
        metrics = {
            "reward/errors": float(errors),
            "reward/timeouts": float(timeouts),
            "reward/mean": sum(rewards) / len(rewards) if rewards else 0.0,
        }
        return rewards, metrics

    def _run_all(self, calls: list, done: threading.Event) -> tuple[list[float], int, int]:
        """Run calls with at most num_workers in flight, each bounded by timeout_s from its start.

        Between rounds the runner blocks until a call finishes (thread calls set `done`; a
        process call's pipe becomes readable) or the oldest running call reaches its timeout.
        It never sleeps on a fixed timer: a 1 ms poll per round was 0.2 s for 512 string
        comparisons (an RL step's rewards), a fifth of a GRPO step on an H200."""
        cfg = self.config
        rewards: list[float] = [cfg.fallback] * len(calls)
        errors = timeouts = 0
        waiting = list(range(len(calls)))[::-1]  # a stack, popped in order
        running: dict[int, float] = {}  # call index -> start time
        while waiting or running:
            while waiting and len(running) < cfg.num_workers:
                i = waiting.pop()
                calls[i].start()
                running[i] = time.monotonic()
            wait_s = max(0.0, min(running.values()) + cfg.timeout_s - time.monotonic())
            if cfg.executor == "thread":
                done.wait(wait_s)
                done.clear()  # before polling: a call finishing after the poll sets it again
            else:
                mp_connection.wait([calls[i].reader for i in running], wait_s)
            for i, started in list(running.items()):
                outcome = calls[i].poll()
                if outcome is not None:
                    del running[i]
                    if outcome[0] == "ok" and math.isfinite(outcome[1]):
                        rewards[i] = outcome[1]
                    else:
                        errors += 1
                        logger.warning("reward %s failed on item %d (fallback %s): %s", cfg.fn, i, cfg.fallback, outcome[1])
                elif time.monotonic() - started > cfg.timeout_s:
                    del running[i]
                    calls[i].kill()
                    timeouts += 1
                    logger.warning("reward %s timed out after %.1fs on item %d (fallback %s)", cfg.fn, cfg.timeout_s, i, cfg.fallback)
        return rewards, errors, timeouts
