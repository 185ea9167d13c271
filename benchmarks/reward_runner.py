"""RewardRunner's overhead per RL step against scoring the same completions inline.

An RL step of recipes/gpu.yaml scores 512 completions (32 prompts x 8 samples, two dynamic-
sampling rounds) with `exact_match`: microseconds of work each. Whatever RewardRunner adds
(a thread or a forked process per call, at most `num_workers` in flight, each with a timeout)
is step time. The inline loop has no timeout and no isolation: it is the floor, not an option.

    python benchmarks/reward_runner.py [--calls 512] [--reps 5]

Prints one table (median of --reps batches after one warm-up batch): seconds per batch and
per call for the inline floor and for each executor.
"""
from __future__ import annotations

import argparse
import statistics
import time

from posttrain.rollout.rewards import RewardConfig, RewardRunner, exact_match


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up: thread and fork machinery, imports
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=512, help="completions per batch (one RL step)")
    ap.add_argument("--process-calls", type=int, default=64, help="batch size for the process executor (a fork each)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    texts = [str(i % 10) for i in range(args.calls)]
    refs = [str(i % 7) for i in range(args.calls)]

    rows = []
    inline = _median_s(lambda: [exact_match(t, r) for t, r in zip(texts, refs)], args.reps)
    rows.append(("inline loop (floor: no timeout, no isolation)", args.calls, inline))
    thread = RewardRunner(RewardConfig(executor="thread"))
    rows.append(("RewardRunner executor=thread, 4 workers", args.calls,
                 _median_s(lambda: thread.score(texts, refs), args.reps)))
    n = args.process_calls
    process = RewardRunner(RewardConfig(executor="process"))
    rows.append(("RewardRunner executor=process, 4 workers", n,
                 _median_s(lambda: process.score(texts[:n], refs[:n]), args.reps)))

    print(f"\n### RewardRunner vs inline scoring (exact_match, median of {args.reps} batches)\n")
    print("| scoring | calls | s per batch | ms per call |")
    print("|---|---:|---:|---:|")
    for name, calls, s in rows:
        print(f"| {name} | {calls} | {s:.4f} | {1000 * s / calls:.3f} |")


if __name__ == "__main__":
    main()
