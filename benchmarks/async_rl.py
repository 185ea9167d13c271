"""Asynchronous (one-step-off-policy) RL against the synchronous loop, on the same recipe.

Each mode is one `posttrain run` of the same rl stage (its own process, its own local Ray
instance; learner and rollout worker are separate Ray actors, `cluster.placement: split`),
differing only in `async_rollout: {max_staleness: 1}`. Both use the same TIS correction. Runs
alternate sync, async, sync, async ... (`--repeats`) so both see the same machine load.
Reported per mode (median over repeats for times, every repeat's accuracy listed):

- throughput: sampled + trained tokens per second of step wall time (the stage summary's
  `sampled_trained_tokens_per_s`, generation, rewards, learner and weight sync included; the
  workers' start and the evals excluded), and the stage's wall time;
- held-out: the stage's own eval (the task's exact match, greedy, on held-out rows) and, as the
  task's reward is a format reward that a fresh model learns within the run, the same reward
  on the held-out prompts (4 samples each at temperature 1, fixed seed): `heldout_reward`;
- the last steps' sampled reward, the staleness and the IS-ratio range the async run trained with.

    python benchmarks/async_rl.py                                   # CPU, tiny-hybrid (~5 min on 2 cores)
    python benchmarks/async_rl.py --device cuda --preset small-hybrid --steps 20 --prompts 32 --new 64 --repeats 1
        # 2 GPUs: learner on GPU 0, rollout worker on GPU 1 (split), bf16, NCCL weight broadcast

Prints the table; writes <out>/async_rl.json and, with matplotlib, <out>/async_rl.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REWARD = "def starts_with_digit(text, reference='', **meta):\n    return float(text[:1].isdigit())\n"

RECIPE = """
name: async-bench
seed: {seed}
model: {model}
tokenizer: {{kind: char}}
cluster: {cluster}
run_dir: {run_dir}
stages:
  - name: rl
    kind: rl
    steps: {steps}
    data: {{task: arithmetic, format: rl, task_args: {{n_train: 2000, n_eval: {n_eval}, min_digits: 1, max_digits: 2}}}}
    prompts_per_step: {prompts}
    sampling: {{n: {n}, temperature: 1.0, max_new_tokens: {new}}}
    rollout: {{max_slots: {slots}}}
    loss: {{kind: grpo, clip_low: 0.2, clip_high: 0.28, aggregation: token_mean}}
    correction: {{mode: tis, high: 2.0}}
    filters: {{dynamic_sampling: false}}
    reward: {{fn: "async_bench_reward:starts_with_digit"}}
    micro_size: {micro}
    optim: {{lr: {lr}, betas: [0.9, 0.95], weight_decay: 0.0}}
    eval: {{every: 0, max_new_tokens: 6, limit: {n_eval}}}
    checkpoint: {{every: {every}}}
{extra}"""


def recipe_text(args: argparse.Namespace, mode: str, run_dir: Path) -> str:
    cuda = args.device == "cuda"
    model = (f"{{preset: {args.preset}, dtype: bfloat16}}" if cuda else
             f"{{preset: {args.preset}" + (f", overrides: {{num_hidden_layers: {args.layers}}}}}" if args.layers else "}"))
    cluster = ("{num_cpus: 8, num_gpus: 2, use_gpus: true, placement: split, learners: 1, rollout_workers: 1}" if cuda
               else f"{{num_cpus: 2, use_gpus: false, placement: split, learners: 1, rollout_workers: 1, "
                    f"cpus_per_rollout_worker: {args.rollout_cpus}}}")
    extra = "    async_rollout: {max_staleness: 1}\n" if mode == "async" else ""
    return textwrap.dedent(RECIPE).format(
        seed=args.seed, model=model, cluster=cluster, run_dir=run_dir, steps=args.steps, n_eval=args.n_eval,
        prompts=args.prompts, n=args.n, new=args.new, slots=args.prompts * args.n, micro=args.prompts * args.n,
        lr=args.lr, every=args.checkpoint_every, extra=extra)


def heldout_reward(run_dir: Path, device: str, new: int, samples: int = 4) -> float:
    """The run's reward (starts with a digit) on the stage's held-out prompts, `samples` completions
    each at temperature 1 from the final checkpoint (fixed seed): the policy's own distribution,
    which greedy decoding (saturated within a few steps on this reward) would hide."""
    import torch

    from posttrain.data import encode_prompt, load_records, load_tokenizer
    from posttrain.models import ModelConfig, load_model
    from posttrain.rollout import SamplingParams, generate_on_model

    tok = load_tokenizer(str(run_dir / "tokenizer"))
    (eval_file,) = run_dir.glob("data/arithmetic*/rl_eval.jsonl")
    records = load_records(eval_file, "rl").records
    final = str(run_dir / "stages" / "00-rl" / "final")
    model = load_model(final, ModelConfig(path=final)).to(device)
    params = SamplingParams(n=samples, temperature=1.0, max_new_tokens=new, stop_token_ids=(tok.eos_token_id,),
                            seed=1234)
    with torch.no_grad():
        outs = generate_on_model(model, [encode_prompt(r, tok) for r in records], params)
    return sum(tok.decode(o, skip_special_tokens=True)[:1].isdigit() for o in outs) / len(outs)


def run_one(args: argparse.Namespace, mode: str, rep: int) -> dict:
    out = Path(args.out)
    run_dir = out / f"{mode}-{rep}"
    recipe = out / f"{mode}-{rep}.yaml"
    recipe.write_text(recipe_text(args, mode, run_dir))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(out), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--overwrite"], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"{mode} run {rep} failed (exit {p.returncode})")
    stage = json.loads((run_dir / "summary.json").read_text())["stages"][0]
    manifest = json.loads((run_dir / "stages" / "00-rl" / "manifest.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    tp = manifest["throughput"]
    tail = train[-5:]
    return {
        "mode": mode, "repeat": rep, "steps": len(train),
        "sampled_trained_tokens_per_s": tp["sampled_trained_tokens_per_s"],
        "sampled_tokens_per_s": tp["sampled_tokens_per_s"], "trained_tokens_per_s": tp["tokens_per_s"],
        "step_seconds_mean": tp["seconds"] / max(len(train), 1), "process_wall_s": wall,
        "generate_s_mean": statistics.mean(r.get("time/generate", 0.0) for r in train),
        "reward_s_mean": statistics.mean(r.get("time/reward", 0.0) for r in train),
        "sync_s_mean": statistics.mean(r.get("time/sync", 0.0) for r in train),
        "learner_s_mean": statistics.mean(r.get("time/learner", 0.0) for r in train),
        "wait_rollout_s_mean": statistics.mean(r.get("time/wait_rollout", 0.0) for r in train),
        "reward_last5": statistics.mean(r["reward/mean"] for r in tail),
        "heldout_exact_match": stage["eval"].get("accuracy", float("nan")),
        "heldout_reward": heldout_reward(run_dir, args.device, args.new),
        "staleness_max": max(r.get("staleness", 0.0) for r in train),
        "generated_ahead_frac": statistics.mean(r.get("async/generated_ahead", 0.0) for r in train),
        "is_ratio_min": min(r["mismatch/is_ratio_min"] for r in train),
        "is_ratio_max": max(r["mismatch/is_ratio_max"] for r in train),
        "is_clip_frac_mean": statistics.mean(r.get("is_clip_frac", 0.0) for r in train),
    }


ROWS = [("sampled+trained tok/s", "sampled_trained_tokens_per_s", "{:.1f}"),
        ("sampled tok/s", "sampled_tokens_per_s", "{:.1f}"), ("trained tok/s", "trained_tokens_per_s", "{:.1f}"),
        ("s/step", "step_seconds_mean", "{:.3f}"), ("  generate s (overlapped if async)", "generate_s_mean", "{:.3f}"),
        ("  reward s (overlapped if async)", "reward_s_mean", "{:.3f}"),
        ("  learner s", "learner_s_mean", "{:.3f}"), ("  weight sync s", "sync_s_mean", "{:.3f}"),
        ("  waiting for rollout s", "wait_rollout_s_mean", "{:.3f}"),
        ("process wall s", "process_wall_s", "{:.1f}"), ("sampled reward, last 5 steps", "reward_last5", "{:.3f}"),
        ("held-out reward (T=1, 4 samples/prompt)", "heldout_reward", "{:.3f}"),
        ("held-out exact match", "heldout_exact_match", "{:.3f}"), ("max staleness", "staleness_max", "{:.0f}"),
        ("steps generated ahead", "generated_ahead_frac", "{:.2f}"), ("IS ratio min", "is_ratio_min", "{:.3f}"),
        ("IS ratio max", "is_ratio_max", "{:.3f}"), ("TIS clipped frac", "is_clip_frac_mean", "{:.4f}")]


def summarise(results: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for mode in ("sync", "async"):
        rs = [r for r in results if r["mode"] == mode]
        out[mode] = {k: statistics.median(r[k] for r in rs) for _, k, _ in ROWS}
    return out


def overlap_bound(s: dict[str, float]) -> float:
    """The most overlap can give, from the sync run's phases: (rollout + learner side) over the
    longer of the two (other per-step work neither overlaps nor shrinks)."""
    rollout, learner = s["generate_s_mean"] + s["reward_s_mean"], s["learner_s_mean"] + s["sync_s_mean"]
    other = max(s["step_seconds_mean"] - rollout - learner, 0.0)
    return s["step_seconds_mean"] / (max(rollout, learner) + other)


def table(summary: dict[str, dict[str, float]], results: list[dict]) -> str:
    s, a = summary["sync"], summary["async"]
    lines = ["| | sync | async (max_staleness 1) | async / sync |", "|---|---:|---:|---:|"]
    lines.append(f"| overlap bound (sync phases: step / (max(rollout, learner) + rest)) | | | "
                 f"{overlap_bound(s):.2f}x |")
    for label, k, fmt in ROWS:
        ratio = f"{a[k] / s[k]:.2f}x" if k.endswith("per_s") and s[k] else ""
        lines.append(f"| {label.strip()} | {fmt.format(s[k])} | {fmt.format(a[k])} | {ratio} |")
    for mode in ("sync", "async"):
        accs = ", ".join(f"{r['heldout_reward']:.3f}" for r in results if r["mode"] == mode)  # noqa
        lines.append(f"| held-out reward, each repeat ({mode}) | {accs if mode == 'sync' else ''} | "
                     f"{accs if mode == 'async' else ''} | |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (label, k) in zip(axes, [("sampled+trained tokens/s", "sampled_trained_tokens_per_s"),
                                     ("s/step", "step_seconds_mean"), ("held-out reward (T=1)", "heldout_reward")]):
        vals = [summary["sync"][k], summary["async"][k]]
        ax.bar(["sync", "async"], vals, color=["#888888", "#2a7ab9"])
        ax.set_title(label)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: 2 GPUs, learner on one, rollout worker on the other (split), bf16")
    p.add_argument("--preset", default="tiny-hybrid")
    p.add_argument("--layers", type=int, default=2, help="num_hidden_layers override on CPU (0: the preset's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new", type=int, default=16, help="max new tokens")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 on cpu (tiny model), 3e-4 on cuda")
    p.add_argument("--n-eval", type=int, default=200, help="held-out prompts")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint.every (async: the step after each checkpoint is not overlapped)")
    p.add_argument("--rollout-cpus", type=float, default=1.0, help="CPU: Ray CPUs the rollout worker reserves")
    p.add_argument("--repeats", type=int, default=2, help="sync/async pairs, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-async-rl")
    args = p.parse_args()
    args.lr = args.lr or (3e-4 if args.device == "cuda" else 3e-3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async_bench_reward.py").write_text(REWARD)
    results = []
    for rep in range(args.repeats):
        for mode in ("sync", "async"):
            r = run_one(args, mode, rep)
            print(f"{mode} #{rep}: {r['sampled_trained_tokens_per_s']:.1f} tok/s, {r['step_seconds_mean']:.3f} s/step, "
                  f"held-out reward {r['heldout_reward']:.3f}", flush=True)
            results.append(r)
    summary = summarise(results)
    text = table(summary, results)
    cfg = (f"{args.device}, {args.preset}" + (f" ({args.layers} layers)" if args.device == "cpu" and args.layers else "")
           + f", {args.steps} steps x {args.prompts} prompts x {args.n} samples, <= {args.new} new tokens, "
           f"median of {args.repeats} alternating runs per mode")
    print(f"\n{cfg}\n\n{text}")
    (out / "async_rl.json").write_text(json.dumps({"config": vars(args), "setup": cfg, "summary": summary,
                                                   "overlap_bound": overlap_bound(summary["sync"]),
                                                   "runs": results}, indent=1))
    if plot(summary, out / "async_rl.png"):
        print(f"\nwrote {out / 'async_rl.json'} and {out / 'async_rl.png'}")
    else:
        print(f"\nwrote {out / 'async_rl.json'} (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
