"""One GRPO step on CPU, split by phase: generate, reward, learner, sync.

Runs the rl stage's own pieces (posttrain.stages.rl.collect_samples / learn, a RolloutGroup of
`--workers` RolloutWorker actors, one DeepSpeed learner, ObjectStoreWeightSync) on a local Ray
instance with the tiny hybrid, on the arithmetic task. `--checkpoint` starts from a trained
checkpoint (e.g. the demo's SFT stage, runs/demo/stages/00-sft/final) so completions have
realistic lengths; by default a fresh preset. The first step is a warm-up and not counted;
the table shows the mean over the remaining `--steps`.

    .venv/bin/python benchmarks/grpo_step_cpu.py [--steps 3] [--prompts 16] [--group 8] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--workers", type=int, default=2, help="rollout workers")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--updates", type=int, default=1, help="optimizer steps per rollout batch (K)")
    parser.add_argument("--checkpoint", default=None, help="HF checkpoint to start from (default: fresh preset)")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    from posttrain.cluster import LearnerGroup, RolloutGroup, start_ray, stop_ray
    from posttrain.config import ClusterConfig, DataConfig, ModelConfig, RLStageConfig
    from posttrain.data import build_tokenizer, encode_prompt, load_tokenizer, token_ids, write_task
    from posttrain.metrics import MetricsLogger
    from posttrain.objectives import PolicyObjective
    from posttrain.rollout import RewardRunner, RolloutConfig, SamplingConfig
    from posttrain.stages.common import StageContext, load_split
    from posttrain.stages.rl import FilterConfig, PhaseTimer, collect_samples, generate_with_recovery, learn
    from posttrain.weight_sync import ObjectStoreWeightSync

    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    tok = load_tokenizer(args.checkpoint) if args.checkpoint else build_tokenizer("char")
    cluster = ClusterConfig(num_cpus=args.num_cpus, rollout_workers=args.workers)
    model = ModelConfig(preset="tiny-hybrid")
    sampling = SamplingConfig(n=args.group, max_new_tokens=args.max_new_tokens)
    cfg = RLStageConfig(name="bench", data=DataConfig(format="rl", task="arithmetic"), steps=args.steps + 1,
                        prompts_per_step=args.prompts, sampling=sampling, rollout=RolloutConfig(engine="native"),
                        filters=FilterConfig(dynamic_sampling=False), updates_per_batch=args.updates,
                        micro_size=args.prompts * args.group)
    ctx = StageContext(model, cluster, 0, tmp, tmp / "stage", tok, tmp, args.checkpoint, MetricsLogger(tmp), console,
                       seed=0)
    files = write_task("arithmetic", tmp / "data", seed=0, n_train=2000, n_eval=100)
    records = load_split(Path(files["rl_train"]), cfg.data, console)
    prompts = [encode_prompt(r, tok) for r in records]

    start_ray(cluster)
    ids = token_ids(tok)
    learners = LearnerGroup(cluster, model, args.checkpoint, token_ids=ids, seed=0)
    learners.configure(cfg.optim, cfg.schedule, cfg.learner, cfg.steps * cfg.updates_per_batch)
    rollouts = RolloutGroup(cluster, cfg.rollout, model, args.checkpoint, token_ids=ids)
    sync = ObjectStoreWeightSync(learners, rollouts, bucket_mb=cfg.rollout.weight_bucket_mb)
    sync.push(0)
    rewards = RewardRunner(cfg.reward)
    objective = PolicyObjective(cfg.loss, cfg.sampling, cfg.correction, chunk_size=cfg.learner.loss_chunk_size)

    def generate(p, params):
        return generate_with_recovery(rollouts, sync, p, params, console)

    rows: list[dict[str, float]] = []
    tokens: list[float] = []
    try:
        for step in range(cfg.steps):
            timer = PhaseTimer()
            samples, metrics = collect_samples(ctx, cfg, step, prompts, records, generate, rewards, timer)
            with timer("learner"):
                learn(ctx, cfg, learners, None, samples, objective, step)
            with timer("sync"):
                sync.push(step + 1)
            if step > 0:
                rows.append(timer.seconds)
                tokens.append(metrics["rollout/tokens"])
    finally:
        rollouts.shutdown()
        learners.shutdown()
        stop_ray()

    phases = ["generate", "reward", "learner", "sync"]
    mean = {p: sum(r.get(p, 0.0) for r in rows) / len(rows) for p in phases}
    total = sum(mean.values())
    table = Table(title=f"one GRPO step on CPU: {args.prompts} prompts x G={args.group}, {args.workers} rollout "
                        f"workers, K={args.updates}, mean of {len(rows)} steps, "
                        f"{sum(tokens) / len(tokens):.0f} completion tokens/step")
    for col in ("phase", "seconds", "share"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for p in phases:
        table.add_row(p, f"{mean[p]:.3f}", f"{100 * mean[p] / total:.1f}%")
    table.add_row("total", f"{total:.3f}", "100%")
    console.print(table)


if __name__ == "__main__":
    main()
