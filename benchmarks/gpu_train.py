"""Training throughput and peak memory on one GPU: `small-hybrid` (2 blocks of 7 lightning +
1 softmax layer, ~250M params) vs a softmax-only model of the same shape; then the longest
sequence for which one training step of the hybrid model fits.

One optimizer step = forward_hidden + chunked token_logprobs (fp32 LM head) + router aux loss,
backward, torch AdamW (betas 0.9/0.95, eps 1e-15), on one sequence of T tokens. Parameters,
activations and AdamW moments in bf16 (no fp32 master copy: DeepSpeed's bf16 mode adds
12 bytes/param, 3 GB here); lightning states fp32 in fla's kernels; gradient checkpointing
on every layer. In process: no Ray, no DeepSpeed.

    python3 benchmarks/gpu_train.py             # 8K/32K/128K both models, then the max length
    python3 benchmarks/gpu_train.py --smoke     # CPU, tiny-hybrid: checks the script only
"""
from __future__ import annotations

import argparse
import re
import time

import torch

from gpu_common import Budget, device_info, free, is_oom, out_dir, peak_gib, print_table, save_json, sync, time_ms
from posttrain.models import HybridForCausalLM, forward_hidden, preset_config, set_gradient_checkpointing, token_logprobs
from posttrain.models.hybrid import FULL, SparseMoE


def build(preset: str, softmax_only: bool, device, dtype) -> HybridForCausalLM:
    config = preset_config(preset)
    if softmax_only:
        config.layer_types = [FULL] * config.num_hidden_layers
    torch.manual_seed(0)
    model = HybridForCausalLM(config).to(device=device, dtype=dtype)
    set_gradient_checkpointing(model, True)
    return model.train()


def train_step(model, opt, ids: torch.Tensor) -> None:
    hidden, aux = forward_hidden(model, ids[:, :-1])
    lp = token_logprobs(model, hidden, ids[:, 1:], chunk_size=4096)
    loss = -lp.mean() + aux
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model, T: int, device, reps: int, warmup: int = 1):
    """(tokens/s, peak GiB) or ("OOM" / error, None)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-15)
    ids = torch.randint(0, model.config.vocab_size, (1, T + 1), device=device)
    free(device)
    try:
        ms = time_ms(lambda: train_step(model, opt, ids), device, warmup=warmup, reps=reps)
        return T / (ms / 1e3), peak_gib(device)
    except Exception as err:  # noqa: BLE001
        model.zero_grad(set_to_none=True)
        del opt
        free(device)
        if is_oom(err):
            return "OOM", None
        return f"error: {type(err).__name__}: {str(err)[:100]}", None


def profile_step(model, T: int, device, path) -> str:
    """Profile one training step (after a warm one); full table to `path`, summary line returned."""
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-15)
    ids = torch.randint(0, model.config.vocab_size, (1, T + 1), device=device)
    train_step(model, opt, ids)
    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, opt, ids)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    # the footer's total counts each kernel once (summing all events counts ops and their kernels)
    found = re.search(r"Self CUDA time total: ([\d.]+)(us|ms|s)", table)
    kernel_s = float(found.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[found.group(2)] if found else 1e-9
    with open(path, "a") as f:
        f.write(f"\n## T={T}: wall {wall:.3f} s under the profiler, device time {kernel_s:.3f} s\n")
        f.write(table)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:6]
    parts = ", ".join(f"{e.key[:40]} {e.self_device_time_total / 1e6 / kernel_s:.0%}" for e in top)
    del opt
    model.zero_grad(set_to_none=True)
    free(device)
    return f"profile T={T}: wall {wall:.2f} s, device {kernel_s:.2f} s; top: {parts}"


def longest_step(model, lengths: list[int], device, budget: Budget, results: list):
    """First T of `lengths` (longest first) whose one training step fits: (T, (tok/s, GiB)) or None."""
    for T in lengths:
        if budget.left() < 0:
            results.append({"model": "hybrid", "T": T, "max_search": "skipped (time budget)"})
            return None
        res = measure(model, T, device, reps=1, warmup=0)  # one step: does it fit, and how long
        results.append({"model": "hybrid", "T": T, "max_search": True, "tokens_per_s": res[0], "peak_gib": res[1]})
        print(results[-1], flush=True)
        if isinstance(res[0], float):
            return T, res
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 262144, 524288])
    ap.add_argument("--models", nargs="+", default=["hybrid", "softmax-only"], choices=["hybrid", "softmax-only"])
    ap.add_argument("--max-lengths", type=int, nargs="*", default=[1048576, 786432, 524288, 262144],
                    help="hybrid only, tried in order until one fits")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the whole script")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="hybrid: profile one step at these T")
    ap.add_argument("--moe-token-chunk", type=int, default=None, help="override SparseMoE.token_chunk")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        device, dtype, preset = torch.device("cpu"), torch.float32, "tiny-hybrid"
        args.lengths, args.max_lengths = [128, 256], [1024, 512]
        args.profile = [128] if args.profile else []
    else:
        device, dtype, preset = torch.device("cuda"), torch.bfloat16, "small-hybrid"
    if args.moe_token_chunk:
        SparseMoE.token_chunk = args.moe_token_chunk
    budget = Budget(args.budget)
    results, rows, longest = [], {}, None
    for softmax_only in [name == "softmax-only" for name in args.models]:
        model = build(preset, softmax_only, device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        name = "softmax-only" if softmax_only else "hybrid"
        for T in args.lengths:
            # a softmax-only step at 512K takes ~1 min: do not start one without the time for it
            need = 0 if T <= 131072 else (T / 131072) ** 2 * (6 if softmax_only else 3)
            if budget.left() < need:
                res = ("skipped (time budget)", None)
            elif T >= 262144:  # one step, no warm-up: kernels are compiled by now, a step takes seconds
                res = measure(model, T, device, reps=1, warmup=0)
            else:
                res = measure(model, T, device, reps=3 if T <= 32768 else 2)
            results.append({"model": name, "params": n_params, "T": T, "tokens_per_s": res[0], "peak_gib": res[1]})
            rows.setdefault(T, {})[name] = res
            print(results[-1], flush=True)
        if not softmax_only:
            for T in args.profile:
                print(profile_step(model, T, device, out_dir() / "profile.txt"), flush=True)
            longest = longest_step(model, args.max_lengths, device, budget, results)
        del model
        free(device)
    info = device_info(device) | {"preset": preset, "dtype": str(dtype), "params": n_params,
                                  "moe_token_chunk": SparseMoE.token_chunk}
    save_json("gpu_train.json", {"info": info, "results": results, "longest_hybrid_step": longest})
    table = []
    for T, r in rows.items():
        h, s = r.get("hybrid", (None, None)), r.get("softmax-only", (None, None))
        ratio = f"{h[0] / s[0]:.2f}x" if isinstance(h[0], float) and isinstance(s[0], float) else "-"
        table.append([T, h[0], h[1], s[0], s[1], ratio])
    print_table(
        f"Training step of {preset} ({n_params / 1e6:.0f}M params) on {info.get('gpu', 'cpu')}: tokens/s and peak GiB",
        ["T", "hybrid tok/s", "hybrid peak GiB", "softmax tok/s", "softmax peak GiB", "hybrid / softmax"],
        table,
    )
    if longest:
        print(f"\nlongest hybrid training step that fit: T={longest[0]:,} tokens, "
              f"{longest[1][0]:,.0f} tok/s, peak {longest[1][1]} GiB")
    elif args.max_lengths and "hybrid" in args.models:
        print(f"\nno hybrid training step fit among {args.max_lengths}")


if __name__ == "__main__":
    main()
