"""Long-context training cost on CPU: tiny-hybrid (7 lightning + 1 softmax layer) vs tiny-softmax
(8 softmax layers), same width, depth and MoE.

One point = one training step on one sequence of T tokens: forward_hidden -> chunked LM-head
log-probs (posttrain.models.token_logprobs, chunk `--loss-chunk`) -> token-mean NLL + router
loss -> backward, optionally with per-layer activation checkpointing. Each point runs in a
fresh subprocess (with `--timeout` seconds) so its peak memory is its own: peak = the
process's RSS high-water mark (getrusage ru_maxrss) during the measured step minus the RSS
before it (model, optimizer-free weights and a short warm-up step are excluded). tokens/s =
T / wall time of that step (the second step at that length; the first one warms the allocator).

    .venv/bin/python benchmarks/long_context_cpu.py [--threads 1] [--lengths 1024 2048 ...]
        [--checkpointing] [--timeout 600] [--png benchmarks/long_context_cpu.png]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("tiny-hybrid", "tiny-softmax")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(preset: str, length: int, *, threads: int, checkpointing: bool, loss_chunk: int) -> dict:
    """Run in the child process: one warm-up step at 256 tokens, then two steps at `length`."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models import build_model, forward_hidden, token_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, gradient_checkpointing=checkpointing,
                      overrides={"max_position_embeddings": max(length, 8192)})
    model = build_model(cfg).train()
    vocab = model.config.vocab_size

    def step(T: int) -> float:
        ids = torch.randint(3, vocab, (1, T))
        start = time.perf_counter()
        hidden, aux = forward_hidden(model, ids)
        targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)  # [1, T]
        logp = token_logprobs(model, hidden, targets, chunk_size=loss_chunk)
        loss = -logp.sum() / (T - 1) + aux
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(256)
    base = _rss_mb()
    first = step(length)  # allocator warm-up at this length
    seconds = step(length)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"model": preset, "T": length, "seconds": seconds, "first_seconds": first,
            "tokens_per_s": length / seconds, "peak_mb": peak - base}


def run_point(preset: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--point", preset, str(length), "--threads", str(args.threads),
           "--loss-chunk", str(args.loss_chunk)] + (["--checkpointing"] if args.checkpointing else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"model": preset, "T": length, "error": f"timeout {args.timeout}s"}
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"]
        return {"model": preset, "T": length, "error": tail[0][:60]}


def table(results: list[dict], args: argparse.Namespace):
    from rich.table import Table

    by = {(r["model"], r["T"]): r for r in results}
    t = Table(title=f"One training step on CPU ({args.threads} thread(s), loss chunk {args.loss_chunk}, "
                    f"checkpointing {'on' if args.checkpointing else 'off'})")
    t.add_column("tokens", justify="right")
    for m in MODELS:
        t.add_column(f"{m} tok/s", justify="right")
        t.add_column(f"{m} peak MiB", justify="right")
    t.add_column("hybrid speed-up", justify="right")
    for T in args.lengths:
        row = [f"{T:,}"]
        for m in MODELS:
            r = by.get((m, T), {})
            row += ([f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:,.0f}"] if "tokens_per_s" in r
                    else [r.get("error", "-"), "-"])
        h, s = by.get(("tiny-hybrid", T), {}), by.get(("tiny-softmax", T), {})
        row.append(f"{s['seconds'] / h['seconds']:.2f}x" if "seconds" in h and "seconds" in s else "-")
        t.add_row(*row)
    return t


def plot(results: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for m in MODELS:
        pts = sorted((r["T"], r) for r in results if r["model"] == m and "seconds" in r)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["seconds"] for p in pts], marker="o", label=m)
        axes[1].plot(xs, [p[1]["tokens_per_s"] for p in pts], marker="o", label=m)
        axes[2].plot(xs, [p[1]["peak_mb"] for p in pts], marker="o", label=m)
    for ax, title in zip(axes, ("seconds per step", "tokens / s", "peak memory of the step (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"Long-context training step on CPU ({args.threads} thread(s), checkpointing "
                 f"{'on' if args.checkpointing else 'off'})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--checkpointing", action="store_true", help="per-layer activation checkpointing")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="tokens per LM-head chunk")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per point")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/long_context_cpu.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--point", nargs=2, metavar=("PRESET", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(args.point[0], int(args.point[1]), threads=args.threads,
                                 checkpointing=args.checkpointing, loss_chunk=args.loss_chunk)))
        return

    from rich.console import Console

    console = Console()
    results = []
    for T in args.lengths:
        for m in args.models:
            r = run_point(m, T, args)
            results.append(r)
            console.print(f"{m:>12} T={T:>6}: " + (f"{r['seconds']:.2f}s  {r['tokens_per_s']:,.0f} tok/s  "
                                                    f"peak {r['peak_mb']:,.0f} MiB" if "seconds" in r else r["error"]))
    console.print(table(results, args))
    plot(results, args.png, args)
    console.print(f"plot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
