"""Rollout throughput on CPU: vllm vs native (continuous batching) vs transformers `generate`.

Two tiny models, each engine on the same weights:
- tiny-hybrid (our MiniMax hybrid): vllm through posttrain's vLLM plugin, native
  (HybridForCausalLM), hf (transformers' MiniMaxForCausalLM);
- tiny-qwen2 (a Hugging Face architecture of about the same size: 8 layers, hidden 128, head_dim
  64, vocab 512): vllm (vLLM's own Qwen2), hf. native only runs our hybrid.
Greedy, every prompt the same length and no stop ids, so every row generates exactly
max_new_tokens and all engines do the same work. The LM head is scaled x8 so greedy choices are
not near-ties of a random model (the "equal" column, vllm's and native's completions against
hf's, is then meaningful). tokens/s counts generated tokens only (prefill included in the time).
Best of `--repeats` runs after one warm-up; the vLLM engine's start-up is reported separately.
Besides wall-clock rates the table gives ratios of process CPU time (vLLM runs in-process, so
its CPU time is counted too): with one thread they are the robust numbers on a machine shared
with other jobs, where wall time swings with the load.

    .venv/bin/python benchmarks/rollout_cpu.py [--threads 1] [--new-tokens 64] [--prompt-len 32]
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import MiniMaxForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import build_model
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.types import SamplingParams
from posttrain.rollout.vllm_engine import engine_for_model, vllm_available


def best_time(engine, prompts: list[list[int]], params: SamplingParams, repeats: int):
    """(best wall seconds, best process CPU seconds, completions of the last run)."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = engine.generate(prompts, params)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, out


class ColdPrefixes:
    """A vllm engine whose prefix cache is emptied before every call: repeats of the same prompts
    would otherwise skip their prefill (the other engines prefill every time)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, prompts, params):
        self.engine.llm.reset_prefix_cache()
        return self.engine.generate(prompts, params)


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # random init is near uniform over 512 tokens: greedy would compare ties
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def tiny_hybrid():
    """(model, {engine name: factory(batch) -> engine}) for tiny-hybrid."""
    model = sharpen(build_model(ModelConfig(preset="tiny-hybrid")))
    hf = HFEngine(MiniMaxForCausalLM(model.config).eval())
    hf.load_weights(model.named_parameters())  # maps checkpoint-layout experts to fused ones
    return model, {"native": lambda batch: NativeEngine(model, num_slots=batch), "hf": lambda batch: hf}


def tiny_qwen2():
    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = sharpen(Qwen2ForCausalLM(config))
    hf = HFEngine(model)
    return model, {"hf": lambda batch: hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-mb", type=float, default=64.0, help="vllm: KV cache + lightning states")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    engines = ["vllm", "native", "hf"] if vllm_available() else ["native", "hf"]

    table = Table(title=f"Rollout tokens/s, CPU, {args.threads} thread(s), prompt {args.prompt_len}, "
                        f"{args.new_tokens} new tokens, greedy")
    for col in ("model", "batch", *[f"{e} tok/s" for e in engines], "vllm / hf (CPU time)", "vllm / native (CPU time)",
                "native / hf (CPU time)", "vllm = hf", "native = hf"):
        table.add_column(col, justify="right")
    starts = []
    for name, build in (("tiny-hybrid", tiny_hybrid), ("tiny-qwen2", tiny_qwen2)):
        model, factories = build()
        if "vllm" in engines:
            start = time.perf_counter()
            vllm = engine_for_model(model, max_num_seqs=max(args.batches),
                                    max_model_len=args.prompt_len + args.new_tokens + 1, kv_cache_mb=args.kv_cache_mb)
            torch.set_num_threads(args.threads)
            starts.append(f"{name}: vLLM engine start {time.perf_counter() - start:.1f} s")
            factories = {"vllm": lambda batch, e=vllm: ColdPrefixes(e), **factories}
        warm = [[1] * args.prompt_len]  # allocator, first-call overheads
        for make in factories.values():
            make(1).generate(warm, params)
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
            runs = {e: best_time(make(batch), prompts, params, args.repeats) for e, make in factories.items()}
            tokens = sum(len(c.token_ids) for c in runs["hf"][2])
            rate = {e: f"{tokens / runs[e][0]:,.0f}" if e in runs else "-" for e in engines}

            def cpu_ratio(a: str, b: str) -> str:  # how many times less CPU time a needs than b
                return f"{runs[b][1] / runs[a][1]:.2f}x" if a in runs and b in runs else "-"

            def equal(a: str) -> str:
                if a not in runs:
                    return "-"
                return f"{sum(x.token_ids == y.token_ids for x, y in zip(runs[a][2], runs['hf'][2]))}/{batch}"

            table.add_row(name, str(batch), *[rate[e] for e in engines], cpu_ratio("vllm", "hf"),
                          cpu_ratio("vllm", "native"), cpu_ratio("native", "hf"), equal("vllm"), equal("native"))
        if "vllm" in engines:
            vllm.close()
    console = Console(width=200)
    console.print(table)
    for line in starts:
        console.print(line)


if __name__ == "__main__":
    main()
