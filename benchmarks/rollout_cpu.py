"""Rollout throughput on CPU: native continuous-batching engine vs transformers `generate`.

Both engines run the same tiny-hybrid weights (ours as HybridForCausalLM, transformers' as
MiniMaxForCausalLM), greedy, every prompt the same length and no stop ids, so every row
generates exactly max_new_tokens and both engines do the same work. The LM head is scaled x8 so
greedy choices are not near-ties of a random model (the "equal" column is then meaningful). tokens/s counts generated
tokens only (prefill included in the time). Best of `--repeats` runs after one warm-up.
Besides wall-clock rates the table gives the ratio of process CPU time (hf / native): with one
thread it is the robust number on a machine shared with other jobs, where wall time swings
with the load.

    .venv/bin/python benchmarks/rollout_cpu.py [--threads 1] [--new-tokens 64] [--prompt-len 32]
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import MiniMaxForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import build_model
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.types import SamplingParams


def best_time(engine, prompts: list[list[int]], params: SamplingParams, repeats: int):
    """(best wall seconds, best process CPU seconds, completions of the last run)."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = engine.generate(prompts, params)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    native_model = build_model(ModelConfig(preset="tiny-hybrid"))
    with torch.no_grad():  # random init is near uniform over 512 tokens: greedy would compare ties
        native_model.lm_head.weight.mul_(8.0)
    hf_model = MiniMaxForCausalLM(native_model.config).eval()
    hf = HFEngine(hf_model)
    hf.load_weights(native_model.named_parameters())  # maps checkpoint-layout experts to fused ones
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    vocab = native_model.config.vocab_size

    # warm-up (allocator, first-call overheads)
    NativeEngine(native_model, num_slots=1).generate([[1] * args.prompt_len], params)
    hf.generate([[1] * args.prompt_len], params)

    table = Table(title=f"Rollout tokens/s, tiny-hybrid ({sum(p.numel() for p in native_model.parameters()) / 1e6:.1f}M params), "
                        f"CPU, {args.threads} thread(s), prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    for col in ("batch", "native tok/s", "hf tok/s", "native / hf (wall)", "native / hf (CPU time)", "greedy outputs equal"):
        table.add_column(col, justify="right")
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=g).tolist()
        native = NativeEngine(native_model, num_slots=batch)
        t_native, c_native, out_native = best_time(native, prompts, params, args.repeats)
        t_hf, c_hf, out_hf = best_time(hf, prompts, params, args.repeats)
        tokens = sum(len(c.token_ids) for c in out_native)
        same = sum(a.token_ids == b.token_ids for a, b in zip(out_native, out_hf))
        table.add_row(str(batch), f"{tokens / t_native:,.0f}", f"{tokens / t_hf:,.0f}",
                      f"{t_hf / t_native:.2f}x", f"{c_hf / c_native:.2f}x", f"{same}/{batch}")
    Console().print(table)


if __name__ == "__main__":
    main()
