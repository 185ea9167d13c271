"""Decode throughput on one GPU: the native engine (fixed-size lightning states, KV cache only for
softmax layers, continuous batching) vs transformers `generate` on the same `small-hybrid`
weights (bf16, fp32 LM head on both), and memory per sequence.

Every point: B prompts of C random tokens, greedy, no stop ids, N new tokens per row. Decode
tokens/s = B * (N - 1) / (generate time - prefill time): the first token comes from the
prefill, which is timed separately (native: its prefill_many calls; transformers: the first
forward of generate). Memory per sequence: native = its cache bytes per slot (lightning states
+ softmax KV at C + N positions); transformers = peak memory during generate above the weights,
divided by B (cache plus transient activations).

    python3 benchmarks/gpu_decode.py            # C in {4K, 32K}, B in {1, 64, 256}
    python3 benchmarks/gpu_decode.py --smoke    # CPU, tiny-hybrid: checks the script only

The native engine runs twice per point: eager (cuda_graphs false), and with `cuda_graphs` (the
engine's default on CUDA: after 8 eager steps its decode step is captured once per generate call
and replayed; the eager steps and the capture are in the timed decode; on the CPU, the smoke
run, the setting does nothing). Session 9's table was measured when the capture came before
the first decode step.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import MiniMaxForCausalLM

import posttrain.rollout.native as native_mod
from gpu_common import Budget, device_info, free, is_oom, print_table, save_json, sync
from posttrain.models import HybridForCausalLM, preset_config
from posttrain.models.decode import DecodeCache
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.types import SamplingParams


def cache_bytes_per_slot(model: HybridForCausalLM, max_len: int) -> int:
    cache = DecodeCache(model, num_slots=1, max_len=max_len)
    tensors = [*cache.linear.values(), *cache.k.values(), *cache.v.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_native(model, prompts, params, device, cuda_graphs: bool = False):
    """(total s, prefill s) of one generate call (with cuda_graphs: the eager steps before the
    capture and the capture itself, once per call, are in the total)."""
    spent = [0.0]
    original = native_mod.prefill_many

    def timed(*a, **kw):
        sync(device)
        start = time.perf_counter()
        out = original(*a, **kw)
        sync(device)
        spent[0] += time.perf_counter() - start
        return out

    native_mod.prefill_many = timed
    try:
        engine = NativeEngine(model, num_slots=len(prompts), cuda_graphs=cuda_graphs)
        sync(device)
        start = time.perf_counter()
        engine.generate(prompts, params)
        sync(device)
        return time.perf_counter() - start, spent[0]
    finally:
        native_mod.prefill_many = original


def run_hf(engine: HFEngine, prompts, params, device):
    """(total s, prefill s, peak bytes above the start) of one generate call."""
    marks: list[float] = []

    def pre(_m, _args, kwargs):
        if not marks:
            sync(device)
            marks.append(time.perf_counter())

    def post(_m, _args, _kwargs, _out):
        if len(marks) == 1:
            sync(device)
            marks.append(time.perf_counter())

    h1 = engine.model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = engine.model.register_forward_hook(post, with_kwargs=True)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        sync(device)
        start = time.perf_counter()
        engine.generate(prompts, params)
        sync(device)
        total = time.perf_counter() - start
    finally:
        h1.remove()
        h2.remove()
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
    return total, marks[1] - marks[0], peak


def profile_steps(model, config, device, context: int = 4096) -> None:
    """Where a native decode step's time goes: host (launches, syncs) vs device kernels."""
    from torch.profiler import ProfilerActivity, profile

    from posttrain.models.decode import decode_step, prefill_many

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for B in (1, 64):
        prompts = torch.randint(3, config.vocab_size, (B, context)).tolist()
        _, states = prefill_many(model, prompts)
        cache = DecodeCache(model, num_slots=B, max_len=context + 16)
        for slot, st in enumerate(states):
            cache.insert(slot, st)
        tokens = torch.randint(3, config.vocab_size, (B,), device=device)
        active = torch.ones(B, dtype=torch.bool, device=device)
        for _ in range(3):
            decode_step(model, tokens, cache, active)
        sync(device)
        start = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(5):
                decode_step(model, tokens, cache, active)
            sync(device)
        wall = (time.perf_counter() - start) / 5 * 1e3
        events = prof.key_averages()
        kernels = sum(e.device_time_total for e in events if e.device_type.name == "CUDA") / 5 / 1e3 if device.type == "cuda" else 0
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")) / 5
        syncs = sum(e.count for e in events if "Synchronize" in e.key) / 5
        print(f"\nnative decode_step, batch {B}, context {context}: {wall:.1f} ms/step under the profiler, "
              f"device kernels {kernels:.2f} ms/step, {launches:.0f} launches/step, {syncs:.0f} syncs/step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))


def guarded(fn):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        if is_oom(err):
            return "OOM"
        return f"error: {type(err).__name__}: {str(err)[:100]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile native decode steps at batch 1 and 64")
    args = ap.parse_args()
    if args.smoke:
        device, dtype, preset = torch.device("cpu"), torch.float32, "tiny-hybrid"
        args.contexts, args.batches, args.new_tokens = [16, 32], [1, 4], 4
    else:
        device, dtype, preset = torch.device("cuda"), torch.bfloat16, "small-hybrid"
    budget = Budget(args.budget)
    torch.manual_seed(0)
    config = preset_config(preset)  # fp32 LM head on (the MiniMax-M1 setting), both engines read it
    model = HybridForCausalLM(config).to(device=device, dtype=dtype).eval()
    hf_model = MiniMaxForCausalLM(config).to(device=device, dtype=dtype).eval()
    hf = HFEngine(hf_model)
    hf.load_weights(model.named_parameters())
    N = args.new_tokens
    params = SamplingParams(temperature=0.0, max_new_tokens=N)
    # warm-up (kernels compile / autotune on first use)
    warm = [[5] * 64]
    NativeEngine(model, num_slots=1).generate(warm, params)
    hf.generate(warm, params)
    results, rows = [], []
    for C in args.contexts:
        for B in args.batches:
            prompts = torch.randint(3, config.vocab_size, (B, C), generator=torch.Generator().manual_seed(B + C)).tolist()
            point = {"context": C, "batch": B, "native_cache_MiB_per_seq": cache_bytes_per_slot(model, C + N) / 2**20}
            # per-batch warm-up: first use of a shape (cuBLAS heuristics, Triton launch
            # specialisation, allocator growth) must not land in the 31 timed steps
            short = [p[:64] for p in prompts]
            guarded(lambda: NativeEngine(model, num_slots=B).generate(short, SamplingParams(temperature=0.0, max_new_tokens=4)))
            guarded(lambda: hf.generate(short, SamplingParams(temperature=0.0, max_new_tokens=4)))
            for name, fn in (("native", lambda: run_native(model, prompts, params, device)),
                             ("graphs", lambda: run_native(model, prompts, params, device, cuda_graphs=True)),
                             ("hf", lambda: run_hf(hf, prompts, params, device))):
                if budget.left() < 0:
                    point[name] = "skipped (time budget)"
                    continue
                free(device)
                res = guarded(fn)
                point[name] = res
                if isinstance(res, tuple):
                    point[f"{name}_decode_tok_s"] = B * (N - 1) / max(res[0] - res[1], 1e-9)
                    point[f"{name}_prefill_s"] = res[1]
                    if name == "hf" and res[2] is not None:
                        point["hf_peak_MiB_per_seq"] = res[2] / B / 2**20
                free(device)
            nat, ref = point.get("native_decode_tok_s"), point.get("hf_decode_tok_s")
            gra = point.get("graphs_decode_tok_s")
            rows.append([
                C, B, nat if nat else point["native"], gra if gra else point["graphs"], ref if ref else point["hf"],
                f"{nat / ref:.2f}x" if nat and ref else "-", f"{gra / ref:.2f}x" if gra and ref else "-",
                point.get("native_prefill_s"), point.get("hf_prefill_s"),
                point["native_cache_MiB_per_seq"], point.get("hf_peak_MiB_per_seq"),
            ])
            print(point, flush=True)
    if args.profile:
        profile_steps(model, config, device)
    info = device_info(device) | {"preset": preset, "dtype": str(dtype), "new_tokens": N}
    save_json("gpu_decode.json", {"info": info, "results": results or rows})
    print_table(
        f"Decode tokens/s, {preset} {str(dtype)[6:]} (fp32 LM head), greedy, {N} new tokens, on {info.get('gpu', 'cpu')}",
        ["context", "batch", "native tok/s", "native + CUDA graphs tok/s", "transformers tok/s", "native / hf",
         "graphs / hf", "native prefill s",
         "hf prefill s", "native MiB/seq (cache)", "hf MiB/seq (peak)"],
        rows,
    )


if __name__ == "__main__":
    main()
