"""LoRA vs full fine-tuning on one GPU: peak memory and step time of an SFT step and an rl step.

The project's own pieces in process (no Ray): a DeepSpeed `Learner` (ZeRO 0, the model's dtype,
gradient checkpointing on every layer) configured with or without a `LoRAConfig`, the SFT
objective on random token rows, and one rl step = native-engine generation on a separate engine
model (the rollout worker's), old log-probs, one GRPO learner step and the weight sync
(posttrain.weight_sync's merged view: every tensor for full fine-tuning, the adapted ones for
LoRA). Each mode runs in its own process so peak memory is its own.

    python3 benchmarks/lora_vs_full.py                      # small-hybrid (~250M), bf16, T=2048
    python3 benchmarks/lora_vs_full.py --preset small-hybrid --seq 4096 --rank 64 --experts
    python3 benchmarks/lora_vs_full.py --smoke              # CPU, tiny-hybrid: checks the script only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def run_mode(args: argparse.Namespace) -> dict:
    from posttrain.data import Example, collate
    from posttrain.learner import DistInfo, Learner, LearnerConfig, OptimConfig, ScheduleConfig
    from posttrain.lora import LoRAConfig, merged_state, merged_tensors, parameter_counts
    from posttrain.models import ModelConfig, build_model
    from posttrain.objectives import GRPOLoss, PolicyObjective, SFTObjective, StepCounts
    from posttrain.rollout import SamplingConfig, SamplingParams
    from posttrain.rollout.native import NativeEngine
    from posttrain.testing import rl_batch_from_samples

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda else "float32"
    model_cfg = ModelConfig(preset=args.preset, dtype=dtype, gradient_checkpointing=True)
    ids = dict(vocab_size=args.vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    lora = LoRAConfig(rank=args.rank, alpha=2 * args.rank, experts=args.experts) if args.mode == "lora" else None
    learner = Learner(model_cfg, None, token_ids=ids, seed=0, dist=DistInfo(master_port=29700 + os.getpid() % 200))
    learner.configure(OptimConfig(lr=1e-5, eps=1e-15), ScheduleConfig(kind="constant"), LearnerConfig(), 100, lora)
    counts = learner.call(parameter_counts)

    def synced() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        synced()
        t0 = time.perf_counter()
        fn()
        synced()
        return time.perf_counter() - t0

    # SFT: `--rows` rows of `--seq` random tokens, every token a target
    g = torch.Generator().manual_seed(0)
    rows = [Example(torch.randint(3, args.vocab, (args.seq,), generator=g).tolist(), [1] * args.seq)
            for _ in range(args.rows)]
    batch = collate(rows, 0)
    sft_counts = StepCounts(tokens=float(args.rows * (args.seq - 1)))
    sft_step = lambda: learner.train_step(SFTObjective(chunk_size=4096), [batch], sft_counts)  # noqa: E731
    sft_step()  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sft_s = min(timed(sft_step) for _ in range(args.reps))
    sft_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    # rl: the engine holds its own copy (as a rollout worker does), synced from the learner
    torch.manual_seed(1)
    engine_model = build_model(model_cfg, **ids).to(device).eval()
    engine = NativeEngine(engine_model, num_slots=args.prompts * args.group)
    plans = {"full": list(learner.call(merged_state)),
             "changing": [n for n, t in learner.call(merged_state).items() if t.changing]}
    engine.load_weights(learner.call(merged_tensors, plans["full"]))
    objective = PolicyObjective(GRPOLoss(), SamplingConfig(n=args.group, temperature=1.0, max_new_tokens=args.new))
    prompts = [torch.randint(3, args.vocab, (64,), generator=g).tolist() for _ in range(args.prompts)]
    times: dict[str, float] = {}

    def rl_step() -> None:
        params = SamplingParams.of(objective.sampling, stop_token_ids=(), seed=0)
        times["generate"] = timed(lambda: times.setdefault("_outs", engine.generate(prompts, params)))
        outs = times.pop("_outs")
        rewards = torch.rand(len(outs), generator=g).tolist()
        b = rl_batch_from_samples(prompts, outs, rewards, args.group, pad_token_id=0)
        c = StepCounts(tokens=float(b.mask.sum()), sequences=float(len(outs)))
        times["learner"] = timed(lambda: (learner.call(objective.logprobs, [b]),
                                          learner.train_step(objective, [b], c)))
        times["sync"] = timed(lambda: engine.load_weights(learner.call(merged_tensors, plans["changing"])))

    rl_step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rl_step()
    rl_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"mode": args.mode, "trainable": counts["trainable"], "share": counts["trainable_share"],
            "sft_s": sft_s, "sft_peak_gib": sft_peak, "sft_tok_s": args.rows * args.seq / sft_s,
            "rl_generate_s": times["generate"], "rl_learner_s": times["learner"], "rl_sync_s": times["sync"],
            "rl_peak_gib": rl_peak, "sync_tensors": len(plans["changing"]), "all_tensors": len(plans["full"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-hybrid")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048, help="SFT tokens per row")
    p.add_argument("--rows", type=int, default=8, help="SFT rows per step (one micro-batch)")
    p.add_argument("--prompts", type=int, default=16, help="rl prompts per step")
    p.add_argument("--group", type=int, default=8, help="rl samples per prompt")
    p.add_argument("--new", type=int, default=256, help="rl max new tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--experts", action="store_true", help="LoRA on the MoE experts too")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny-hybrid, tiny sizes")
    p.add_argument("--mode", choices=["full", "lora"], help="(internal) run one mode and print its JSON")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.vocab, args.seq, args.rows, args.prompts, args.group, args.new, args.reps = (
            "tiny-hybrid", 512, 64, 2, 2, 2, 8, 1)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return
    results = []
    for mode in ("full", "lora"):
        argv = [a for a in sys.argv[1:] if a != "--smoke"] + (["--smoke"] if args.smoke else []) + ["--mode", mode]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{mode}: failed")
        results.append(json.loads(line[7:]))
    keys = ["trainable", "share", "sft_s", "sft_tok_s", "sft_peak_gib", "rl_generate_s", "rl_learner_s", "rl_sync_s",
            "rl_peak_gib", "sync_tensors"]
    print(f"{'':16}" + "".join(f"{r['mode']:>14}" for r in results))
    for k in keys:
        print(f"{k:16}" + "".join(f"{r[k]:>14.4g}" for r in results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
