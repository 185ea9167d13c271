"""Where the RL learner's time goes on a GPU: one micro-batch's log-probs (no grad) and
forward+backward, through the shared-prefix forward (each distinct prompt once) and through
the plain full forward, on the small-hybrid in bf16 with the fp32 LM head (recipes/gpu.yaml's
model), for two shapes:

  retrieval  4 prompts x 8 samples, 2,048-token prompts, 4 new tokens (gpu.yaml's grpo stage)
  cispo      4 prompts x 8 samples, 32-token prompts, 128 new tokens (vs_trl's RL rows)

Prints a table (median ms over --reps after --warmup, and the first call's ms, which holds
Triton compilation and autotuning) and, with --profile, torch.profiler's top ops of one
shared-prefix forward+backward by CPU and by CUDA time.

    python3 benchmarks/rl_learner_gpu.py [--reps 5] [--profile]     (needs CUDA; --smoke on CPU)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_common import print_table, sync

from posttrain.models.build import build_model
from posttrain.models.config import ModelConfig
from posttrain.objectives.common import target_logprobs
from posttrain.objectives.rl import RLBatch

SHAPES = {"retrieval": (4, 8, 2048, 4), "cispo": (4, 8, 32, 128)}  # prompts, samples, prompt len, new tokens


def make_batch(prompts: int, samples: int, prompt_len: int, new: int, vocab: int, device: str,
               seed: int) -> RLBatch:
    """prompts x samples rows: each prompt's samples side by side, completions of 1..new tokens."""
    g = torch.Generator().manual_seed(seed)
    B, T = prompts * samples, prompt_len + new
    ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for p in range(prompts):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g)
        for s in range(samples):
            b = p * samples + s
            n = int(torch.randint(1, new + 1, (1,), generator=g))
            comp = torch.randint(3, vocab, (n,), generator=g)
            ids[b, :prompt_len], ids[b, prompt_len:prompt_len + n] = prompt, comp
            mask[b, :prompt_len + n] = 1
            targets[b, prompt_len - 1:prompt_len + n - 1] = comp
    pos = torch.arange(T).expand(B, T).contiguous()
    batch = RLBatch(ids, targets, pos, mask, torch.randn(B, generator=g), torch.zeros(B, T))
    return RLBatch(*(getattr(batch, f).to(device) for f in
                     ("input_ids", "targets", "position_ids", "attention_mask", "advantages", "rollout_logprobs")))


def timed(fn, device: torch.device) -> float:
    """Wall milliseconds of one fn() call (each call is another batch, so no median here)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny-hybrid on the CPU (checks the script runs)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    cfg = ModelConfig(preset="tiny-hybrid" if args.smoke else "small-hybrid",
                      dtype="float32" if args.smoke else "bfloat16")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2).to(device).train()
    rows = []
    for name, shape in SHAPES.items():
        if args.smoke:
            shape = (2, 4, 64, 8)
        for share in (True, False):
            batches = [make_batch(*shape, 128, device, seed) for seed in range(args.warmup + args.reps)]

            def no_grad(b, share=share):
                with torch.no_grad():
                    target_logprobs(model, b.model_batch, chunk_size=4096, share_prefixes=share)

            def fwd_bwd(b, share=share):
                logp, _, aux = target_logprobs(model, b.model_batch, chunk_size=4096, share_prefixes=share)
                (logp.sum() + aux).backward()
                model.zero_grad(set_to_none=True)

            t_ng = [timed(lambda b=b: no_grad(b), device) for b in batches]
            t_fb = [timed(lambda b=b: fwd_bwd(b), device) for b in batches]
            rows.append((name, "shared prefix" if share else "full forward", t_ng[0], t_fb[0],
                         statistics.median(t_ng[args.warmup:]), statistics.median(t_fb[args.warmup:])))
            print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print_table(f"RL learner micro-batch on {where} ({cfg.preset}, {cfg.dtype}; median of {args.reps} after "
                f"{args.warmup} warm-up)", ["shape", "path", "first no-grad ms", "first fwd+bwd ms", "no-grad ms",
                                            "fwd+bwd ms"], rows)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, shape in SHAPES.items():
            b = make_batch(*(shape if not args.smoke else (2, 4, 64, 8)), 128, device, 99)
            with profile(activities=acts) as prof:
                logp, _, aux = target_logprobs(model, b.model_batch, chunk_size=4096, share_prefixes=True)
                (logp.sum() + aux).backward()
                sync(device)
            model.zero_grad(set_to_none=True)
            for key in ("cpu_time_total", "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"):
                print(f"\n#### {name}, shared prefix fwd+bwd, top ops by {key}\n")
                print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
