"""posttrain vs TRL, side by side: SFT, DPO, GRPO and CISPO on the same model, data and batch shape.

For each model family (our MiniMax hybrid, a Qwen2-shaped transformers model) one checkpoint
is built and saved (same weights for both sides), the arithmetic task's files are written once,
and every (family, stage) row runs both sides, each in its own process, one after the other
(the order alternates row by row, so on a shared machine both see the same contention):

    posttrain   `python -m posttrain.cli run <generated recipe>` (the real pipeline: Ray, DeepSpeed
                learner, rollout worker with its default engine: native for the hybrid, hf else)
    TRL         SFTTrainer / DPOTrainer / GRPOTrainer (loss_type grpo or cispo), no vLLM

Same on both sides (the `settings` block of the JSON says it again): precision (fp32 on CPU,
bf16 weights on CUDA), transformers' default attention (sdpa) for softmax layers, torch threads
per process, AdamW betas/eps/lr (constant, no warm-up), grad clip 1.0, global batch and
micro-batch, max length, prompts x samples per RL step, max new tokens, temperature 1, no
top-p/top-k, one optimizer step per rollout batch, beta = 0 (no KL, no reference model in RL),
DPO reference log-probs computed once before training, the fp32 LM head in RL (posttrain's
default, TRL's cast_lm_head_to_fp32) and not in SFT/DPO (TRL has no switch there).

Measured: the first `--warmup` optimizer steps are excluded; then over the `--steps` timed ones,
step time = wall time between consecutive optimizer-step ends (posttrain: its own `time/step`,
the same definition: generation, reward, learner and weight sync included) and

    SFT  trained (completion) tokens / s      DPO  pairs / s
    RL   (sampled + trained completion tokens) / s   (one update per batch: 2 x sampled)

Peak memory: CPU: the largest summed PSS of the side's process tree (posttrain: the driver, Ray's
daemons and actors), sampled every second; CUDA: torch.cuda.max_memory_allocated of the training
process (posttrain: the learner; its colocated rollout worker is a separate process, not included:
the JSON also has the whole tree's device memory from nvidia-smi when available).

    .venv/bin/python benchmarks/vs_trl.py --device cpu --out benchmark_out/vs_trl      # tiny, ~15 minutes
    python3 benchmarks/vs_trl.py --device cuda --stages cispo grpo sft dpo --budget 300 --timeout 200 --out $OUT/vs_trl

Decoding differs by default, and the JSON's `decode` block says how each side ran: on CUDA
posttrain's RL rows replay their decode step as a CUDA graph (rollout.cuda_graphs: the native
engine's for the hybrid, the hf engine's static cache and compiled step for qwen2), while TRL
decodes with transformers' dynamic cache. `--eager-decode` turns posttrain's off;
`--trl-static-cache` gives TRL transformers' own static cache (GRPOConfig
cache_implementation='static', which transformers compiles on CUDA).

`--async-rl` runs posttrain's RL rows one step off-policy (generation of step t + 1 overlapping
the learner's step t; async_rollout + TIS correction): not like for like, since TRL's rows stay
synchronous (it has no such mode without vLLM); the table's title says so.

Rows run stage by stage in `--stages` order (both families each), so with `--budget` the rows
that matter most come first. Each side runs from a directory of its own under `--out` (never
the repository root, which would shadow the installed posttrain inside Ray workers).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

STAGES = ("sft", "dpo", "grpo", "cispo")
FAMILIES = ("hybrid", "qwen2")
# model sizes: (hybrid preset, qwen2 config keys)
SIZES = {
    "cpu": ("tiny-hybrid", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=64)),
    "cuda": ("small-hybrid", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=4, head_dim=64)),
}


@dataclass(frozen=True)
class Settings:
    """Everything both sides share; posttrain_recipe and trl_config read only this."""

    device: str = "cpu"
    threads: int = 1  # torch intra-op threads per process (posttrain: cluster.torch_threads)
    steps: int = 4  # timed optimizer steps
    warmup: int = 1  # untimed optimizer steps before them
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    sft_batch: int = 32
    sft_micro: int = 32
    dpo_batch: int = 16
    dpo_micro: int = 16
    max_len: int = 64  # SFT / DPO tokens per sequence
    beta: float = 0.1  # DPO
    prompts: int = 8  # RL prompts per step
    group: int = 4  # RL samples per prompt
    rl_micro: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    # posttrain's RL rows: the decode step as a CUDA graph (rollout.cuda_graphs, on by default on
    # CUDA: the native engine's own for the hybrid, the hf engine's static cache + compiled step
    # for qwen2); False (--eager-decode) pins rollout.cuda_graphs: false
    cuda_graphs: bool = True
    # TRL's RL rows: GRPOConfig(cache_implementation="static") (--trl-static-cache), with which
    # transformers compiles TRL's decode step too. Off: TRL's default (a dynamic cache, eager)
    trl_static_cache: bool = False
    # posttrain's RL rows (--async-rl): one step off-policy (async_rollout max_staleness 1, TIS
    # correction at 2.0; docs/async_rl.md), generation of step t + 1 overlapping the learner's
    # step t. Not like for like: TRL without vLLM has no such mode, so the table says which ran
    async_rl: bool = False
    # --profile: torch.profiler over two more optimizer steps after the timed ones on both sides
    # (posttrain: learner.profile; TRL: a callback); each row's report goes to its dir and its head
    # into the log. Untimed: writing the report and trace would land in the last profiled step
    profile: bool = False

    @property
    def profile_window(self) -> tuple[int, int]:
        """1-based optimizer steps both sides profile: the two after the timed ones."""
        return self.warmup + self.steps + 1, self.warmup + self.steps + 2

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + (2 if self.profile else 0)

    def timed(self, step: int) -> bool:
        """Whether 1-based optimizer step `step` is timed (not warm-up, not profiled)."""
        return self.warmup < step <= self.warmup + self.steps


PRESETS = {  # --preset: the sizes each device runs by default
    "cpu": Settings(),
    # issue 16's shape: 8 prompts x 8 samples, <= 128 new tokens; SFT as recipes/gpu.yaml (128 rows x 64)
    # 2 untimed steps on CUDA: a GPU process compiles on its first updates, and posttrain's
    # learner and rollout worker each do (H200, qwen2 CISPO: step 2 took 5.0 s, steps 3-5 2.4-2.5 s)
    "cuda": Settings(device="cuda", threads=4, steps=4, warmup=2, sft_batch=128, sft_micro=128, dpo_batch=64,
                     dpo_micro=64, max_len=64, prompts=8, group=8, rl_micro=32, max_new_tokens=128),
}


# ------------------------------------------------------------------------------ the two configs
def posttrain_recipe(s: Settings, family: str, stage: str, paths: dict[str, str], run_dir: str) -> dict[str, Any]:
    """The recipe `posttrain run` gets for one row (one stage, starting from the shared checkpoint)."""
    rl = stage in ("grpo", "cispo")
    cluster: dict[str, Any] = {"num_cpus": max(2, s.threads * 2), "learners": 1, "rollout_workers": 1,
                               "torch_threads": s.threads}
    common: dict[str, Any] = {
        "name": stage, "kind": "rl" if rl else stage, "steps": s.total_steps,
        "optim": {"lr": s.lr, "betas": list(s.betas), "eps": s.eps, "weight_decay": 0.0, "grad_clip": s.grad_clip},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "eval": {"every": 0}, "checkpoint": {"every": 0},
        # CUDA: DeepSpeed bf16 with ZeRO-1, as recipes/gpu.yaml (fp32 master weights and AdamW state)
        "learner": {"zero_stage": 1 if s.device == "cuda" else 0},
    }
    if s.profile:
        common["learner"]["profile"] = list(s.profile_window)
    if stage == "sft":
        common |= {"data": {"train": paths["sft"], "format": "prompt_completion", "max_seq_len": s.max_len},
                   "batch": {"global_size": s.sft_batch, "micro_size": s.sft_micro}}
    elif stage == "dpo":
        common |= {"data": {"train": paths["pref"], "format": "preference", "max_seq_len": s.max_len},
                   "pairs": {"source": "file", "eval_fraction": 0.0},
                   "loss": {"kind": "sigmoid", "beta": s.beta},
                   "batch": {"global_size": s.dpo_batch, "micro_size": s.dpo_micro}}
    else:
        loss = ({"kind": "grpo", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "seq_mean"} if stage == "grpo"
                else {"kind": "cispo", "eps_high": 4.0})
        common |= {"data": {"train": paths["rl"], "format": "rl"}, "prompts_per_step": s.prompts,
                   "sampling": {"n": s.group, "temperature": s.temperature, "top_p": 1.0, "top_k": 0,
                                "max_new_tokens": s.max_new_tokens},
                   "loss": loss, "filters": {"dynamic_sampling": False}, "reward": {"fn": "exact_match"},
                   "updates_per_batch": 1, "micro_size": s.rl_micro}
        if not s.cuda_graphs:
            common["rollout"] = {"cuda_graphs": False}
        if s.async_rl:
            common |= {"async_rollout": {"max_staleness": 1}, "correction": {"mode": "tis", "high": 2.0}}
    return {"name": f"vs-trl-{family}-{stage}", "seed": s.seed, "run_dir": run_dir,
            "model": {"path": paths[family], "dtype": s.dtype, "fp32_lm_head": rl},
            "tokenizer": {"kind": "path", "path": paths["tokenizer"]}, "cluster": cluster, "stages": [common]}


def trl_config(s: Settings, stage: str, output_dir: str) -> dict[str, Any]:
    """Keyword arguments of the TRL config class of `stage` (SFTConfig, DPOConfig, GRPOConfig)."""
    cfg: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=s.total_steps, learning_rate=s.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=s.betas[0], adam_beta2=s.betas[1], adam_epsilon=s.eps, weight_decay=0.0,
        max_grad_norm=s.grad_clip, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
        seed=s.seed, bf16=s.device == "cuda", use_cpu=s.device == "cpu", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if stage == "sft":
        cfg |= dict(per_device_train_batch_size=s.sft_micro, gradient_accumulation_steps=s.sft_batch // s.sft_micro,
                    max_length=s.max_len, packing=False, completion_only_loss=True)
    elif stage == "dpo":
        cfg |= dict(per_device_train_batch_size=s.dpo_micro, gradient_accumulation_steps=s.dpo_batch // s.dpo_micro,
                    max_length=s.max_len, beta=s.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True)
    else:
        n = s.prompts * s.group
        cfg |= dict(per_device_train_batch_size=s.rl_micro, gradient_accumulation_steps=n // s.rl_micro,
                    num_generations=s.group, max_completion_length=s.max_new_tokens, temperature=s.temperature,
                    top_p=1.0, top_k=0, loss_type=stage, beta=0.0, num_iterations=1, scale_rewards="group",
                    mask_truncated_completions=False, use_vllm=False, cast_lm_head_to_fp32=True,
                    # TRL's CISPO clamps the IS weight at epsilon_high itself; posttrain's at 1 + eps_high
                    epsilon=0.2, epsilon_high=0.28 if stage == "grpo" else 5.0)
        if s.trl_static_cache:
            cfg |= dict(cache_implementation="static")
    return cfg


# ------------------------------------------------------------------------------ shared inputs
def prepare(work: Path, s: Settings, families: list[str]) -> dict[str, str]:
    """Tokenizer, data files and one checkpoint per family under `work`; returns their paths."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.data import build_tokenizer, token_ids, write_task
    from posttrain.data.io import write_jsonl_atomic
    from posttrain.data.tokenizer import save_tokenizer
    from posttrain.models import ModelConfig, build_model

    tok = build_tokenizer("char")
    paths = {"tokenizer": str(save_tokenizer(tok, work / "tokenizer"))}
    files = write_task("arithmetic", work / "data" / "task", seed=s.seed, n_train=4000, n_eval=100,
                       min_digits=1, max_digits=3)
    rows = [json.loads(ln) for ln in Path(files["sft_train"]).read_text().splitlines()]
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rng = random.Random(s.seed)
    paths["sft"] = str(files["sft_train"])  # posttrain: prompt_completion strings
    paths["sft_trl"] = str(write_jsonl_atomic(work / "data" / "sft_trl.jsonl", [
        {"prompt": user(r["prompt"]), "completion": bot(r["completion"])} for r in rows]))  # TRL: the same rows as chat
    # Pairs: the right answer over a near miss. Just enough for the run (both sides precompute
    # reference log-probs over the whole file before step 1).
    n_pairs = s.dpo_batch * s.total_steps
    paths["pref"] = str(write_jsonl_atomic(work / "data" / "pref.jsonl", [
        {"prompt": user(r["prompt"]), "chosen": bot(r["completion"]),
         "rejected": bot(str(int(r["completion"]) + rng.choice([-10, -1, 1, 10])))} for r in rows[:n_pairs]]))
    rl_rows = [json.loads(ln) for ln in Path(files["rl_train"]).read_text().splitlines()]
    paths["rl"] = str(write_jsonl_atomic(work / "data" / "rl.jsonl", [
        {"prompt": user(r["prompt"]), "answer": r["answer"]} for r in rl_rows]))
    preset, qwen = SIZES[s.device]
    ids = token_ids(tok)
    for family in families:
        out = work / "ckpt" / family
        torch.manual_seed(s.seed)
        if family == "hybrid":
            model = build_model(ModelConfig(preset=preset), **ids)
        else:
            config = Qwen2Config(vocab_size=ids["vocab_size"], pad_token_id=ids["pad_token_id"],
                                 bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                                 max_position_embeddings=4096, tie_word_embeddings=False, **qwen)
            model = Qwen2ForCausalLM(config)
        model.to(getattr(torch, s.dtype)).save_pretrained(str(out))
        tok.save_pretrained(str(out))
        paths[family] = str(out)
        paths[f"{family}_params"] = str(sum(p.numel() for p in model.parameters()))
    return paths


# ------------------------------------------------------------------------------ memory
class Sampler:
    """Peak memory of a process tree, sampled every `every` seconds in a thread: summed PSS
    (CPU; shared pages counted once) and, on CUDA, the tree's device memory from nvidia-smi."""

    def __init__(self, pid: int, cuda: bool, every: float = 1.0) -> None:
        self.pid, self.cuda, self.every = pid, cuda, every
        self.pss_peak = 0.0
        self.daemons_at_peak = 0.0
        self.gpu_peak: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = daemons = 0.0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    mem = getattr(info, "pss", info.rss)
                    total += mem
                    if p is not root and not " ".join(p.cmdline()[:1]).startswith("ray::"):
                        daemons += mem
                except psutil.Error:
                    continue
            if total > self.pss_peak:
                self.pss_peak, self.daemons_at_peak = total, daemons
            if self.cuda:
                used = _gpu_used({p.pid for p in procs})
                if used is not None:
                    self.gpu_peak = max(self.gpu_peak or 0.0, used)

    def stop(self) -> dict[str, Optional[float]]:
        self._stop.set()
        self._thread.join()
        return {"pss_peak_gib": self.pss_peak / 2**30, "pss_non_actor_gib": self.daemons_at_peak / 2**30,
                "gpu_tree_peak_gib": self.gpu_peak}


def _gpu_used(pids: set[int]) -> Optional[float]:
    """Bytes of device memory nvidia-smi reports for `pids` (None without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    total = 0.0
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids:
            total += float(mib) * 2**20
    return total


def run_process(cmd: list[str], cwd: Path, log: Path, cuda: bool, timeout: float) -> tuple[int, float, dict]:
    """Run `cmd` from `cwd` (never the repo root: it would shadow the installed package inside
    Ray workers), output to `log`; (exit code, wall seconds, memory peaks)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    if cuda:  # one GPU per side, whatever the machine has (TRL refuses several GPUs in one process:
        # it would wrap the model in nn.DataParallel; found on a 2-GPU H200 machine)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid, cuda)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            f.write(f"\n[vs_trl] killed after {timeout:.0f} s\n")
        mem = sampler.stop()
    return rc, time.perf_counter() - t0, mem


# ------------------------------------------------------------------------------ posttrain side
def run_posttrain(s: Settings, family: str, stage: str, paths: dict[str, str], work: Path, timeout: float) -> dict:
    import yaml

    row_dir = work / "posttrain" / f"{family}-{stage}"
    row_dir.mkdir(parents=True, exist_ok=True)
    recipe = posttrain_recipe(s, family, stage, paths, str(row_dir / "run"))
    (row_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(row_dir / "recipe.yaml"), "--overwrite"]
    rc, wall, mem = run_process(cmd, row_dir, row_dir / "log.txt", s.device == "cuda", timeout)
    out: dict[str, Any] = {"rc": rc, "process_wall_s": wall, **mem, "log": str(row_dir / "log.txt")}
    metrics = row_dir / "run" / "metrics.jsonl"
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.exists() else []
    train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["step"])
    timed = [r for r in train if s.timed(r["step"])]
    if rc != 0 or len(timed) < s.steps:
        return out | {"error": f"posttrain exited {rc} with {len(timed)} timed steps (log: {row_dir / 'log.txt'})"}
    rl = stage in ("grpo", "cispo")
    steps = [r["time/step"] for r in timed]
    if rl:
        work_per_step = [r["rollout/tokens"] + r["tokens"] for r in timed]
        out["phases_s"] = {k[5:]: sum(r.get(k, 0.0) for r in timed) / len(timed)
                           for k in ("time/generate", "time/reward", "time/learner", "time/sync")}
        out["sampled_tokens_per_step"] = sum(r["rollout/tokens"] for r in timed) / len(timed)
    else:
        work_per_step = [r["tokens"] for r in timed] if stage == "sft" else [float(s.dpo_batch)] * len(timed)
        learner = sum(r.get("time/learner", 0.0) for r in timed) / len(timed)  # the learner's round trip
        out["phases_s"] = {"learner": learner, "driver": sum(steps) / len(steps) - learner}
    out |= _rates(steps, work_per_step)
    if s.profile:  # the learner's steps only (an rl row's generation runs in the rollout worker)
        what = "posttrain, the learner's steps" + (" (generation is not in them)" if rl else "")
        out["profile"] = show_profile(f"{family} {stage} {what}", sorted(row_dir.glob("run/stages/*/profile/rank0.txt")))
    if s.device == "cuda":
        out["peak_gib"] = max((r.get("gpu_peak_gib", 0.0) for r in train), default=None)
    else:
        out["peak_gib"] = mem["pss_peak_gib"]
    return out


def _rates(step_s: list[float], work: list[float]) -> dict[str, float]:
    return {"step_s": sum(step_s) / len(step_s), "rate": sum(work) / sum(step_s), "work_per_step": sum(work) / len(work),
            "step_s_all": step_s}


# ------------------------------------------------------------------------------ TRL side
def run_trl(s: Settings, family: str, stage: str, paths: dict[str, str], work: Path, timeout: float) -> dict:
    row_dir = work / "trl" / f"{family}-{stage}"
    row_dir.mkdir(parents=True, exist_ok=True)
    spec = {"settings": dataclasses.asdict(s), "family": family, "stage": stage, "paths": paths,
            "config": trl_config(s, stage, str(row_dir / "out")), "result": str(row_dir / "result.json")}
    (row_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(row_dir / "spec.json")]
    rc, wall, mem = run_process(cmd, row_dir, row_dir / "log.txt", s.device == "cuda", timeout)
    out: dict[str, Any] = {"rc": rc, "process_wall_s": wall, **mem, "log": str(row_dir / "log.txt")}
    result = Path(spec["result"])
    if rc != 0 or not result.exists():
        return out | {"error": f"TRL exited {rc} (log: {row_dir / 'log.txt'})"}
    res = json.loads(result.read_text())
    if s.profile:
        what = "TRL, its whole steps" + (" (generation included)" if stage in ("grpo", "cispo") else "")
        out["profile"] = show_profile(f"{family} {stage} {what}", [row_dir / "profile.txt"])
    out |= _rates(res["step_s"], res["work"]) | {k: v for k, v in res.items() if k not in ("step_s", "work")}
    out["peak_gib"] = res["cuda_peak_gib"] if s.device == "cuda" else mem["pss_peak_gib"]
    return out


def show_profile(label: str, found: list[Path]) -> Optional[str]:
    """Print the head of a row's profile report (its wall, device time and phases); its path."""
    if not found or not found[0].exists():
        print(f"{label}: no profile report", flush=True)
        return None
    head = found[0].read_text().split("## top operators")[0].strip()
    print(f"{label} profile ({found[0]}):\n" + textwrap.indent(head, "  "), flush=True)
    return str(found[0])


def trl_worker(spec_path: str) -> None:
    """In its own process: one TRL trainer for one row; writes per-step times and work."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from posttrain.data import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    s = Settings(**{**spec["settings"], "betas": tuple(spec["settings"]["betas"])})
    stage, paths = spec["stage"], spec["paths"]
    torch.set_num_threads(s.threads)
    tok = load_tokenizer(paths["tokenizer"])
    if s.device == "cuda" and spec["family"] == "hybrid":
        # the SDPA backends posttrain's hybrid uses (models/hybrid.py: flash, efficient, math):
        # cuDNN's fails inside transformers' MiniMax generate on an H200 ("misaligned address";
        # under CUDA_LAUNCH_BLOCKING=1, cuDNN's mha_graph.execute in the softmax layers). Without
        # cuDNN, the memory-efficient kernel then refused the padding mask transformers passes
        # ("(*bias): last dimension must be contiguous", H200, session 10): TRL's hybrid keeps
        # flash (no mask) and math (with one), which is where SDPA sends a mask it cannot take
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    model = AutoModelForCausalLM.from_pretrained(paths[spec["family"]], dtype=getattr(torch, s.dtype),
                                                 attn_implementation="sdpa")
    counted: list[float] = []  # work counted by the trainer so far (tokens)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if s.device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.marks.append(sum(counted))

    class Profile(TrainerCallback):  # --profile: the same optimizer steps as posttrain's learner.profile
        def __init__(self) -> None:
            from posttrain.profiling import StepProfiler

            self.steps = StepProfiler(s.profile_window, str(Path(spec["result"]).parent), 0)

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.steps.begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if s.device == "cuda":
                torch.cuda.synchronize()
            self.steps.end(state.global_step)

    clock = Clock()
    callbacks = [clock] + ([Profile()] if s.profile else [])
    load = lambda key: load_dataset("json", data_files=paths[key], split="train")  # noqa: E731
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        class Counting(SFTTrainer):
            def compute_loss(self, model, inputs, *a, **kw):  # noqa: ANN001
                labels = inputs.get("labels")
                if labels is not None:  # targets: label positions after the first, not ignored
                    counted.append(float((labels[:, 1:] != -100).sum()))
                return super().compute_loss(model, inputs, *a, **kw)

        trainer = Counting(model=model, args=SFTConfig(**spec["config"]), train_dataset=load("sft_trl"),
                           processing_class=tok, callbacks=callbacks)
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**spec["config"]), train_dataset=load("pref"),
                             processing_class=tok, callbacks=callbacks)
    else:
        from trl import GRPOConfig, GRPOTrainer

        def exact_match(prompts, completions, answer, **kw):  # noqa: ANN001
            return [float(c[0]["content"].strip() == a.strip()) for c, a in zip(completions, answer)]

        class Counting(GRPOTrainer):
            def _generate_and_score_completions(self, inputs):  # noqa: ANN001
                out = super()._generate_and_score_completions(inputs)
                counted.append(float(out["completion_mask"].sum()))
                return out

        trainer = Counting(model=model, reward_funcs=exact_match, args=GRPOConfig(**spec["config"]),
                           train_dataset=load("rl"), processing_class=tok, callbacks=callbacks)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    for cb in callbacks:  # the report under the name show_profile reads
        if isinstance(cb, Profile) and cb.steps.written is not None:
            cb.steps.written.rename(cb.steps.written.with_name("profile.txt"))
    ends, marks = clock.ends, clock.marks
    timed = [i for i in range(1, len(ends)) if s.timed(i + 1)]  # ends[i]: the end of step i + 1
    step_s = [ends[i] - ends[i - 1] for i in timed]
    if stage == "dpo":
        work = [float(s.dpo_batch)] * len(step_s)
    else:
        per_step = [marks[i] - marks[i - 1] for i in timed]
        # RL: sampled + trained completion tokens (one update per batch: the same tokens twice)
        work = [2 * w for w in per_step] if stage in ("grpo", "cispo") else per_step
    res: dict[str, Any] = {"step_s": step_s, "work": work, "steps_seen": len(ends)}
    if stage in ("grpo", "cispo"):
        res["sampled_tokens_per_step"] = sum(work) / 2 / len(work)
    if s.device == "cuda":
        res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(spec["result"]).write_text(json.dumps(res))


# ------------------------------------------------------------------------------ report
UNITS = {"sft": "trained tok/s", "dpo": "pairs/s", "grpo": "(sampled+trained) tok/s", "cispo": "(sampled+trained) tok/s"}


def table_rows(results: list[dict]) -> list[list[Any]]:
    rows = []
    for r in results:
        p, t = r.get("posttrain", {"error": "not run (--sides)"}), r.get("trl", {"error": "not run (--sides)"})
        ratio = p["rate"] / t["rate"] if "rate" in p and "rate" in t and t["rate"] else None
        rows.append([r["family"], r["stage"], UNITS[r["stage"]], p.get("rate", p.get("error", "-")),
                     t.get("rate", t.get("error", "-")), p.get("step_s"), t.get("step_s"), p.get("peak_gib"),
                     t.get("peak_gib"), f"{ratio:.2f}x" if ratio else "-"])
    return rows


COLUMNS = ["family", "stage", "unit", "posttrain", "TRL", "step s posttrain", "step s TRL", "peak GiB posttrain",
           "peak GiB TRL", "posttrain / TRL"]


def print_table(title: str, rows: list[list[Any]]) -> str:
    def fmt(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    lines = [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def plot(results: list[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return None
    done = [r for r in results if "rate" in r.get("posttrain", {}) and "rate" in r.get("trl", {})]
    if not done:
        return None
    width = 1.3 * len(done) + 2
    fig, ax = plt.subplots(figsize=(width, 4))
    xs = range(len(done))
    ratios = [r["posttrain"]["rate"] / r["trl"]["rate"] for r in done]
    bars = ax.bar(xs, ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0, max(ratios + [1.0]) * 1.12)  # room for the bar labels
    ax.bar_label(bars, labels=[f"{x:.2f}x" for x in ratios])
    ax.set_xticks(list(xs), [f"{r['family']}\n{r['stage']}" for r in done])
    ax.set_ylabel("throughput posttrain / TRL")
    ax.set_title(textwrap.fill(title, int(width * 12)), fontsize=9)  # wrapped: a 2-row figure clipped it
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--out", default="benchmark_out/vs_trl", help="JSON, PNG, logs and runs go here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per side per row")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: no new row starts after this (rows run stage by stage, in --stages order)")
    ap.add_argument("--sides", nargs="+", choices=["posttrain", "trl"], default=["posttrain", "trl"],
                    help="run only these sides (e.g. re-run TRL's rows after a fix on its side)")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):  # every shared setting, defaults from the device's preset
        if f.name not in ("device", "betas", "cuda_graphs", "async_rl", "trl_static_cache", "profile"):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(PRESETS["cpu"], f.name)))
    ap.add_argument("--eager-decode", dest="cuda_graphs", action="store_false", default=None,
                    help="posttrain's RL rows: rollout.cuda_graphs false (no CUDA-graph decode, which is on "
                         "by default on CUDA)")
    ap.add_argument("--trl-static-cache", dest="trl_static_cache", action="store_true", default=None,
                    help="TRL's RL rows with cache_implementation='static' (transformers then compiles its decode "
                         "step on CUDA); off: TRL's default dynamic cache")
    ap.add_argument("--async-rl", dest="async_rl", action="store_true", default=None,
                    help="posttrain's RL rows one step off-policy (async_rollout, TIS correction): generation "
                         "overlaps the learner; TRL's rows stay synchronous (it has no such mode without vLLM)")
    ap.add_argument("--profile", dest="profile", action="store_true", default=None,
                    help="torch.profiler over two more, untimed steps after the timed ones on both sides (posttrain: "
                         "learner.profile, the learner's steps; TRL: its whole step, so its RL rows' include "
                         "generation); reports in each row's dir, their heads in the log")
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
             if f.name not in ("device", "betas") and getattr(args, f.name) is not None}
    s = dataclasses.replace(PRESETS[args.device], **given)
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(work, s, args.families)
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s: " + ", ".join(
        f"{f} {int(paths[f + '_params']) / 1e6:.2f}M params" for f in args.families), flush=True)
    results = []
    for i, (stage, family) in enumerate((st, f) for st in args.stages for f in args.families):
        order = ["posttrain", "trl"] if i % 2 == 0 else ["trl", "posttrain"]
        row: dict[str, Any] = {"family": family, "stage": stage, "order": order}
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            print(f"{family} {stage}: skipped (past --budget {args.budget:.0f} s)", flush=True)
            results.append(row | {side: {"error": "skipped (time budget)"} for side in order})
            continue
        for side in (x for x in order if x in args.sides):
            fn = run_posttrain if side == "posttrain" else run_trl
            t1 = time.perf_counter()
            row[side] = fn(s, family, stage, paths, work, args.timeout)
            print(f"{family} {stage} {side}: {row[side].get('rate', row[side].get('error'))} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
        results.append(row)
        _save(out, s, paths, results, args)
    title = (f"posttrain vs TRL on {s.device} ({s.dtype}, {s.threads} thread(s)/process): mean of {s.steps} steps "
             f"after {s.warmup} warm-up; RL {s.prompts} prompts x {s.group} samples, <= {s.max_new_tokens} new tokens"
             + ("; posttrain's RL one step off-policy (--async-rl), TRL's synchronous" if s.async_rl else ""))
    text = print_table(title, table_rows(results))
    (out / "vs_trl.md").write_text(text + "\n")
    png = plot(results, out / "vs_trl.png", title)
    print(f"\nwrote {out / 'vs_trl.json'}" + (f", {png}" if png else "") + f" ({time.perf_counter() - t0:.0f} s)")


def decode_setup(s: Settings) -> dict[str, str]:
    """How each side's RL rows decode (the one setting where the sides differ by default)."""
    if s.device != "cuda":
        graphs = "eager (CUDA graphs apply on CUDA only)"
    elif s.cuda_graphs:
        graphs = ("rollout.cuda_graphs default: hybrid, the native engine's captured decode step; qwen2, the hf "
                  "engine's StaticCache (bucketed length) and torch.compile reduce-overhead step")
    else:
        graphs = "rollout.cuda_graphs false (--eager-decode): eager decoding"
    trl = ("GRPOConfig cache_implementation='static' (--trl-static-cache): transformers' StaticCache, its decode "
           "step compiled on CUDA" if s.trl_static_cache else "TRL's default: transformers' dynamic cache, eager")
    return {"posttrain": graphs, "trl": trl}


def _save(out: Path, s: Settings, paths: dict[str, str], results: list[dict], args: argparse.Namespace) -> None:
    import platform

    import torch
    import transformers
    import trl

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    if s.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import fla  # noqa: F401

        info["fla"] = True
    except Exception:  # noqa: BLE001
        info["fla"] = False
    payload = {"info": info, "settings": dataclasses.asdict(s), "paths": paths, "columns": COLUMNS,
               "table": table_rows(results), "results": results,
               "fair": "same checkpoint, data files, precision, attention (sdpa), threads/process, optimizer, batch "
                       "and micro-batch, max length, prompts x samples, max new tokens, optimizer steps; no vLLM; "
                       "warm-up steps excluded; see the module docstring",
               "decode": decode_setup(s)}
    (out / "vs_trl.json").write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
