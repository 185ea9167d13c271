"""The learner: one DeepSpeed data-parallel rank holding the policy being trained.

A plain class: `posttrain.cluster` wraps it with `ray.remote` (one actor per rank), and
tests and GPU benchmarks use it in-process. Stage loops hand it micro-batches, the step's
global counts (`StepCounts`) and an *objective* — a frozen dataclass from posttrain.objectives
holding its own typed loss config, called as `objective(model, micro, counts) -> (loss,
metrics)` — so the learner knows nothing about SFT, DPO or RL.

The learner owns the configs of what it does: OptimConfig, ScheduleConfig and LearnerConfig
(the recipe's `optim:`, `schedule:` and `learner:` of a stage).

Normalisation: objectives divide by the token (or sequence) count of the whole optimizer
step across micro-batches and ranks (`StepCounts`), so the gradient of one step is the
gradient of the global-batch loss. DeepSpeed would also divide by the number of
micro-batches and average over ranks; we undo both (`scale_wrt_gas=False`, loss x world
size), which is what makes 1x8 == 8x1 and world size 2 == world size 1 hold exactly.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch

from posttrain.data.collate import to_device
from posttrain.faults import kill_point
from posttrain.lora import LoRAConfig, apply_lora, merged_state
from posttrain.models import ModelConfig, eval_mode
from posttrain.objectives.common import Gathered, Objective, StepCounts
from posttrain.profiling import StepProfiler, phase
from posttrain.zero3 import gathers_whole_model, head_parameters, set_moe_leaves, whole


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. MiniMax-M1 used betas (0.9, 0.95) and eps 1e-15 for RL."""

    lr: float = 1e-3  # peak learning rate (the schedule multiplies it)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW beta1, beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive finite number, got {self.lr}"),
            (all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {list(self.betas)}"),
            (self.eps > 0 and math.isfinite(self.eps), "eps", f"must be a positive finite number, got {self.eps}"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay",
             f"must be a finite number >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0 and math.isfinite(self.grad_clip), "grad_clip",
             f"must be a finite number >= 0 (0: off), got {self.grad_clip}"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate multiplier per optimizer step: linear warm-up, then constant or decay."""

    kind: Literal["constant", "cosine", "linear"] = "cosine"  # shape after warm-up
    warmup_steps: int = 0  # linear ramp from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine/linear end at lr * min_lr_ratio

    def __post_init__(self) -> None:
        if not self.warmup_steps >= 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class LearnerConfig:
    """How the DeepSpeed ranks hold and train the model."""

    zero_stage: Literal[0, 1, 2, 3] = 0  # ZeRO stage (optimizer / gradient / parameter sharding)
    offload_optimizer: bool = False  # optimizer state in CPU memory
    offload_param: bool = False  # ZeRO-3 only: each rank's parameter slices in CPU memory between uses
    loss_chunk_size: int = 1024  # tokens per chunk of the LM-head cross-entropy (bounds logits memory)
    gradient_checkpointing: Optional[bool] = None  # recompute layer activations; null: model.gradient_checkpointing
    # [first, last]: torch.profiler over these optimizer steps of the stage (1-based, inclusive) on
    # every rank -> <stage dir>/profile/rank<R>.txt and .trace.json.gz (posttrain.profiling); null: off
    profile: Optional[tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.profile is not None and not (len(self.profile) == 2 and 1 <= self.profile[0] <= self.profile[1]):
            raise ValueError(f"profile: must be [first, last] optimizer steps with 1 <= first <= last, "
                             f"got {list(self.profile)}")
        if not self.loss_chunk_size >= 1:
            raise ValueError(f"loss_chunk_size: must be >= 1, got {self.loss_chunk_size}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3 (ZeRO-Offload moves the sharded "
                             "optimizer state), got zero_stage 0")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"offload_param: needs zero_stage 3 (only ZeRO-3 partitions parameters), "
                             f"got zero_stage {self.zero_stage}")


class Learners(Protocol):
    """The stage loops' handle on the learner ranks (posttrain.cluster.LearnerGroup hosts one
    Learner per rank on Ray; tests may use anything with these methods). Calls go to every
    rank; answers are rank 0's (metrics are already all-reduced), except an objective's `Gathered`
    outputs of train_step / evaluate: every rank's micro-batches, rank-major."""

    world_size: int

    def configure(self, optim: OptimConfig, schedule: ScheduleConfig, learner: LearnerConfig,
                  total_steps: int, lora: Optional[LoRAConfig] = None, adapter: Optional[str] = None,
                  profile_dir: Optional[str] = None) -> None: ...

    def train_step(self, objective: Objective, per_rank: list[list[Any]], counts: StepCounts) -> dict[str, Any]: ...

    def evaluate(self, objective: Objective, per_rank: list[list[Any]], counts: StepCounts) -> dict[str, Any]: ...

    def call_rank0(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def call_rank0_async(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def close_profile(self) -> None: ...

    def save_pretrained(self, out_dir: str) -> None: ...

    def save_state(self, state_dir: str, extra: dict[str, Any]) -> None: ...

    def load_state(self, state_dir: str) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500  # used when rendezvous is None (a Learner outside Ray)
    rendezvous: Optional[str] = None  # Ray actors: rank 0 binds a port itself and publishes it (posttrain.rendezvous)


def lr_lambda(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step `step` (0-based): warmup then decay."""

    def f(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.kind == "constant":
            return 1.0
        span = max(1, total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        lo = schedule.min_lr_ratio
        if schedule.kind == "linear":
            return 1.0 - (1.0 - lo) * progress
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def init_distributed(dist: DistInfo) -> None:
    import deepspeed
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    # On CUDA each rank sees only the GPU(s) Ray assigned it (CUDA_VISIBLE_DEVICES), so its local
    # device index is 0 whatever its global rank: DeepSpeed binds the device from LOCAL_RANK.
    cuda = torch.cuda.is_available()
    local = bind_device().index if cuda else dist.rank
    backend = "nccl" if cuda else "gloo"
    store, port = None, dist.master_port
    if dist.rendezvous is not None:
        from posttrain.rendezvous import rendezvous_store

        store = rendezvous_store(dist.rendezvous, dist.master_addr, dist.rank, dist.world_size)
        port = store.port
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    os.environ.update(
        MASTER_ADDR=dist.master_addr, MASTER_PORT=str(port),
        RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(local),
        LOCAL_WORLD_SIZE=str(1 if cuda else dist.world_size),
    )
    if store is not None:  # DeepSpeed adopts a default group that exists (as it would build it: a
        # bound device on CUDA when there are peers, so NCCL sets up its communicator eagerly)
        bound = {"device_id": torch.device("cuda", local)} if cuda and dist.world_size > 1 else {}
        tdist.init_process_group(backend, store=store, rank=dist.rank, world_size=dist.world_size, **bound)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def torch_extensions_dir() -> Path:
    """Where this install's JIT-built DeepSpeed ops live (TORCH_EXTENSIONS_DIR, unless the user
    set it). On CPU, DeepSpeed's gloo backend loads a shared-memory op that it compiles on first
    use (~40 s on 2 cores). torch's default directory is shared by every install of one Python
    version, and its build files name the install's torch headers: two virtualenvs on one
    machine rebuilt it on each other's runs, and one's build lock could stall the other's
    learners. One directory per torch install (its path and version) keeps a build for good."""
    install = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:10]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path.home() / ".cache" / "posttrain" / "torch_extensions" / f"{py}_torch{torch.__version__}_{install}"


def prebuild_ops() -> Optional[Path]:
    """Build the ops a learner would JIT-compile at its first start (`make install` calls this,
    so the first run does not spend its first minute compiling). Returns the built library, or
    None where the accelerator needs none (CUDA: NCCL)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    return Path(op.__file__) if op is not None else None


def bind_device() -> torch.device:
    """The device this process computes on. Ray gives each learner rank and rollout worker its
    GPUs by setting CUDA_VISIBLE_DEVICES, so the process's first visible GPU is its own: never
    a device picked by global rank (two ranks on one machine would then share cuda:0 or reach
    across to cuda:1). CPU when there is no CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def placement_info(device: Any) -> dict[str, Any]:
    """What Ray assigned the calling actor and the device it bound (tests, logs)."""
    import ray

    ctx = ray.get_runtime_context()
    return {"gpu_ids": sorted(str(g) for g in ray.get_gpu_ids()), "device": str(device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "node_id": ctx.get_node_id(),
            "local_rank": os.environ.get("LOCAL_RANK"),
            "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),  # its JIT-built ops
            # what this process's CUDA caching allocator holds on the device, and how much of
            # it live tensors use (GPU only)
            **({"cuda_reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
                "cuda_allocated_mib": torch.cuda.memory_allocated(device) / 2**20}
               if torch.device(device).type == "cuda" else {})}


def release_engine(engine: Any) -> None:
    """Let a DeepSpeed engine, its optimizer state included, be freed while its module lives on
    (the next stage's engine wraps the same module). `engine.destroy()` drops the optimizer's
    hooks but leaves the forward pre/post hooks the engine put on the module; their closures hold
    the engine, so every kept stage leaked the last one's optimizer (2.5 GiB per stage for the
    196M-parameter GPU recipe: fp32 master weights and two Adam moments) and ran its forward
    prologue on every forward."""
    from deepspeed.runtime.zero import parameter_offload

    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    # ZeRO-3 pushes the engine's top module onto a module-level stack that nothing pops: it (and
    # through its parameters the optimizer) would outlive the engine
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not engine.module]


def live_engines() -> int:
    """DeepSpeed engines this process still holds (a learner rank: one; more means a kept
    stage's engine, with its optimizer state, was not freed: see release_engine)."""
    from deepspeed import DeepSpeedEngine

    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


def _bf16_has_overflow_scan() -> bool:
    """Whether this DeepSpeed's bf16 config has check_grad_overflow (it forbids unknown keys;
    releases without the key have no such scan either)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return "check_grad_overflow" in DeepSpeedBF16Config.model_fields


def deepspeed_config(optim: OptimConfig, learner: LearnerConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a stage's engine (our torch AdamW and LR schedule are handed over
    as objects)."""
    zero: dict[str, Any] = {"stage": learner.zero_stage}
    if learner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if learner.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        # DeepSpeed insists on a batch geometry; we drive accumulation boundaries
        # ourselves (set_gradient_accumulation_boundary), so these are nominal.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        # offload_optimizer steps our torch AdamW on the CPU copies (DeepSpeed refuses a client
        # optimizer with offload unless told; its DeepSpeedCPUAdam would need a compiled op)
        "zero_force_ds_cpu_optimizer": False,
    }
    if dtype == "bfloat16":
        # check_grad_overflow (DeepSpeed's default) scans every gradient for inf/NaN before each
        # step and skips the step on one: hundreds of kernels and a host sync per step, for a
        # loss scale bf16 does not have (vs_trl's Qwen2 SFT row on an H200: docs/benchmarks.md,
        # session 17). A non-finite gradient norm stops the stage instead
        # (stages.common.check_finite), as it does in fp32.
        cfg["bf16"] = {"enabled": True}
        if _bf16_has_overflow_scan():
            cfg["bf16"]["check_grad_overflow"] = False
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


class Learner:
    """One rank: model + DeepSpeed engine. Build with `Learner(...)`, then `configure(...)`
    once per stage (a new optimizer and schedule), then `train_step(...)` repeatedly."""

    def __init__(self, model_cfg: ModelConfig, init_path: Optional[str], *, token_ids: dict[str, Any],
                 seed: int, dist: DistInfo = DistInfo(), threads: Optional[int] = None):
        """`token_ids`: vocab_size and pad/bos/eos ids of the run's tokenizer (a fresh preset
        model is sized by them; a checkpoint is checked against them)."""
        from posttrain.models import build_model, load_model

        if threads:
            torch.set_num_threads(threads)
        self.dist = dist
        self.seed = seed
        init_distributed(dist)
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.model_cfg = model_cfg
        if init_path is not None:
            self.model = load_model(init_path, model_cfg)
        else:
            self.model = build_model(model_cfg, **token_ids)
        self.device = bind_device()
        self.model.to(self.device)
        self.engine = None
        self.step = 0
        self.profiler: Optional[StepProfiler] = None  # learner.profile's window of the current stage

    peft: Any = None  # the PeftModel handle while the stage trains LoRA adapters (configure(lora=...))

    # ------------------------------------------------------------------ setup
    def configure(self, optim: OptimConfig, schedule: ScheduleConfig, learner: LearnerConfig,
                  total_steps: int, lora: Optional[LoRAConfig] = None, adapter: Optional[str] = None,
                  profile_dir: Optional[str] = None) -> None:
        """A new optimizer and schedule over the trainable parameters. `lora`: inject peft adapters
        (continuing the saved `adapter` dir when given) and train only them; the module the
        objectives see stays the model itself, with peft's layers inside. `profile_dir`: where
        `learner.profile` writes this rank's report (the stage's profile/ dir)."""
        import deepspeed

        from posttrain.models import set_gradient_checkpointing

        # every stage's random draws (dropout, router jitter, adapter init) start from the run's
        # seed, on new learners and on learners kept from the last stage alike (a resumed run,
        # whose learners are new, draws what an uninterrupted one with kept learners drew)
        torch.manual_seed(self.seed)
        if self.engine is not None:  # a new stage: keep the weights, drop the last engine (its hooks:
            # ZeRO's gradient reduction, ZeRO-3's gathers) and its optimizer state before the next
            if self.zero3:  # whole (merged) weights in a plain module, no ZeRO-3 partitions
                self.model, self.peft = self._consolidated(), None
            else:
                self.model = self.engine.module
            release_engine(self.engine)
            self.engine = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.peft is not None:  # a new stage after a LoRA one starts from the merged weights
            self.model, self.peft = self.peft.merge_and_unload(), None
        if lora is not None:
            self.peft = apply_lora(self.model, lora, adapter)
            self.model = self.peft.get_base_model()
        if learner.zero_stage == 3:  # before initialize: DeepSpeed installs its hooks there
            set_moe_leaves(self.model)
        self.model.train()
        if learner.gradient_checkpointing is not None:  # per-stage memory knob (long context)
            set_gradient_checkpointing(self.model, learner.gradient_checkpointing)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                weight_decay=optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, total_steps))
        ds_cfg = deepspeed_config(optim, learner, self.model_cfg.dtype, self.dist.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=opt,
                                                     lr_scheduler=sched, config=ds_cfg)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step = 0
        self.close_profile()  # a window the last stage did not finish (normally closed by finish_stage)
        self.profiler = (StepProfiler(learner.profile, profile_dir, self.dist.rank)
                         if learner.profile is not None and profile_dir is not None else None)

    # --------------------------------------------------------------- training
    def train_step(self, objective: Objective, micro_batches: list[Any], counts: StepCounts) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns summed metrics.

        Every rank must receive the same number of micro-batches. Objectives return
        metrics as *sums over the step's normaliser* (e.g. loss already divided by the
        global count), so summing over micro-batches and ranks gives global values.
        A `Gathered` output comes back as the list of this rank's micro-batch values (in order).
        """
        assert self.engine is not None, "call configure() first"
        kill_point("learner", self.step + 1)  # fault tests: this rank dies before the step
        if self.profiler is None:
            return self._train_step(objective, micro_batches, counts)
        self.profiler.begin(self.step + 1)
        try:
            out = self._train_step(objective, micro_batches, counts)
        except BaseException as err:  # the report of the steps so far, this one cut short
            self.profiler.close(f"step {self.step + 1} raised {type(err).__name__}")
            raise
        self.profiler.end(self.step)
        return out

    def _train_step(self, objective: Objective, micro_batches: list[Any], counts: StepCounts) -> dict[str, Any]:
        eng = self.engine
        totals: dict[str, Any] = {}  # metric sums, read back once after eng.step() (_as_floats)
        gathered: dict[str, list[torch.Tensor]] = {}
        n = len(micro_batches)
        zero_opt = eng.zero_optimization_stage() > 0
        for i, micro in enumerate(micro_batches):
            eng.set_gradient_accumulation_boundary(i == n - 1)
            if zero_opt:  # what engine.forward does first (we call the module itself): without
                # it ZeRO-3 counts every micro-batch as the first and overwrites the gradients
                eng.optimizer.clear_backward_seen_flag()
            with whole(head_parameters(eng.module)):  # ZeRO-3: the log-prob path reads the head weight
                with phase("forward"):
                    loss, metrics = objective(eng.module, to_device(micro, self.device), counts)
                with phase("backward"):
                    eng.backward(loss * self.dist.world_size, scale_wrt_gas=False)
            _accumulate(totals, gathered, metrics)
        # ZeRO >= 1 reports the (pre-clipping) norm from its optimizer; plain fp32 DeepSpeed
        # (stage 0) does not track it, so it is read off the gradients before the step.
        grad_norm = _grad_norm(eng.module) if eng.zero_optimization_stage() == 0 else None
        with phase("optimizer_step"):
            eng.step()
        if grad_norm is None:
            grad_norm = eng.get_global_grad_norm()
        self.step += 1
        with phase("metrics_readback"):  # waits for the device to finish the step
            floats = _as_floats(totals)
        out = _all_reduce_sum(floats)
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["lr"] = float(eng.get_lr()[0])
        if self.device.type == "cuda":  # since configure(): the stage's peak on this rank
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return {**out, **gathered}

    def close_profile(self) -> None:
        """The stage ends: write learner.profile's report if its window is still open (the stage
        made fewer optimizer steps than the window's last: rl steps without an informative group
        make none)."""
        if self.profiler is not None:
            self.profiler.close("the stage ended before the window's last step")

    @torch.no_grad()
    def evaluate(self, objective: Objective, micro_batches: list[Any], counts: StepCounts) -> dict[str, Any]:
        """Sum an objective's metrics over micro-batches without updating anything (`Gathered`
        outputs listed as in train_step)."""
        totals: dict[str, Any] = {}
        gathered: dict[str, list[torch.Tensor]] = {}
        with eval_mode(self.module), whole(head_parameters(self.module)):
            for micro in micro_batches:
                _, metrics = objective(self.module, to_device(micro, self.device), counts)
                _accumulate(totals, gathered, metrics)
        return {**_all_reduce_sum(_as_floats(totals)), **gathered}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(model, *args)` on this rank's model (e.g. generation for eval). Under ZeRO-3
        every rank must make the same call (`follow` on all but one): the whole model is gathered
        for it (or, for `own_gathers` functions, each tensor they read; posttrain.zero3)."""
        model = self.module
        with whole(model.parameters() if gathers_whole_model(fn) else ()):
            return fn(model, *args)

    def follow(self, fn: Callable[..., Any], *args: Any) -> None:
        """ZeRO-3: take part in a `call` another rank answers (the same gathers), answering nothing."""
        self.call(fn, *args)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.model

    @property
    def zero3(self) -> bool:
        """Whether the engine partitions the parameters (ZeRO-3): whole-weight reads gather."""
        return self.engine is not None and self.engine.zero_optimization_partition_weights()

    def _consolidated(self) -> torch.nn.Module:
        """A plain copy of the ZeRO-3 model (adapters merged) for the next stage's engine: a new
        engine cannot take over modules that carry the previous one's hooks and partitions."""
        state = self.state_dict()  # every rank gathers
        base = self.module
        plain = type(base)(base.config)
        plain.load_state_dict(state)  # into the class's default dtype: the engine casts (bf16/fp16 config)
        return plain.to(self.device)

    def placement(self) -> dict[str, Any]:
        """Where this rank runs (tests and logs): see placement_info."""
        return placement_info(self.device)

    # ------------------------------------------------------------ weights
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU under a plain checkpoint's names; LoRA adapters merged
        (posttrain.lora.merged_state). ZeRO 0-2 keep full parameters on every rank; under ZeRO-3
        each tensor is gathered in turn, so every rank must call this."""
        return {k: t.get().to("cpu", copy=True) for k, t in merged_state(self.module).items()}

    def save_pretrained(self, out_dir: str) -> None:
        """Rank 0 writes a Hugging Face checkpoint (safetensors) into `out_dir`; with LoRA the
        merged weights there and the adapter (PEFT format) in `out_dir/adapter`. Under ZeRO-3
        every rank takes part (the weights are gathered tensor by tensor)."""
        if self.zero3:
            state, adapter = self.state_dict(), self._adapter_state()
        elif self.dist.rank != 0:
            return
        else:
            state = None if self.peft is None else self.state_dict()
            adapter = None
        if self.dist.rank != 0:
            return
        self.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        if self.peft is not None:
            self.peft.save_pretrained(str(Path(out_dir, "adapter")), safe_serialization=True, state_dict=adapter)

    def _adapter_state(self) -> Optional[dict[str, torch.Tensor]]:
        """ZeRO-3 with LoRA: the trainable tensors (adapters, fully trained modules) of the peft
        model, gathered, under peft's names (what its save_pretrained picks the adapter from)."""
        if self.peft is None:
            return None
        out = {}
        for k, p in self.peft.state_dict(keep_vars=True).items():
            if p.requires_grad:
                with whole([p]):
                    out[k] = p.detach().to("cpu", copy=True)
        return out

    # ------------------------------------------------------- training state
    def save_state(self, state_dir: str, extra: dict[str, Any]) -> None:
        """All ranks: DeepSpeed checkpoint (weights, optimizer, LR schedule) into state_dir.

        The caller makes it atomic (writes into a temp dir and renames after every rank
        returned). Files are our own torch checkpoints, never loaded from elsewhere.
        """
        assert self.engine is not None
        # With LoRA the frozen base is the stage's init checkpoint: only adapters are saved.
        # The RNG state too: adapter dropout draws from it, and a resumed run must draw the same.
        rng = {"cpu": torch.random.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        self.engine.save_checkpoint(state_dir, tag="ds", client_state={"learner_step": self.step, "rng": rng},
                                    save_latest=False, exclude_frozen_parameters=self.peft is not None)
        if self.dist.rank == 0:
            Path(state_dir, "progress.json").write_text(json.dumps(extra))

    def load_state(self, state_dir: str) -> dict[str, Any]:
        assert self.engine is not None
        _, client = self.engine.load_checkpoint(state_dir, tag="ds", load_module_strict=self.peft is None)
        self.step = int(client["learner_step"])
        if "rng" in client:  # states saved before the RNG was part of them load too
            torch.random.set_rng_state(client["rng"]["cpu"])
            if client["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(client["rng"]["cuda"])
        return json.loads(Path(state_dir, "progress.json").read_text())


def _accumulate(totals: dict[str, Any], gathered: dict[str, list[torch.Tensor]], metrics: dict[str, Any]) -> None:
    """Add one micro-batch's metric contributions to `totals` (tensors stay tensors, on their
    device: no host sync per metric); list its `Gathered` outputs."""
    for k, v in metrics.items():
        if isinstance(v, Gathered):
            gathered.setdefault(k, []).append(v.value)
        else:
            v = v.detach().double().reshape(()) if isinstance(v, torch.Tensor) else float(v)
            totals[k] = totals[k] + v if k in totals else v


def _as_floats(totals: dict[str, Any]) -> dict[str, float]:
    """`totals` as Python floats, with one device-to-host copy for all tensor values: read after
    the optimizer step has been launched, so the host does not wait for the backward before it
    queues the step's kernels (on CUDA a float() per metric did)."""
    keys = [k for k, v in totals.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in totals.items() if k not in keys}
    if keys:
        device = totals[keys[0]].device
        out.update(zip(keys, torch.stack([totals[k].to(device) for k in keys]).tolist()))
    return {k: out[k] for k in totals}


def join_rank_answers(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The group's answer to train_step / evaluate from each rank's (rank order): rank 0's
    all-reduced metrics, and each `Gathered` output's lists joined rank-major (so they line up
    with the per-rank micro-batches flattened rank by rank)."""
    out = dict(answers[0])
    for k, v in answers[0].items():
        if isinstance(v, list):
            out[k] = [x for a in answers for x in a[k]]
    return out


def _all_reduce_sum(metrics: dict[str, float]) -> dict[str, float]:
    import torch.distributed as tdist

    if not metrics or not tdist.is_initialized() or tdist.get_world_size() == 1:
        return dict(metrics)
    keys = sorted(metrics)
    # NCCL reduces CUDA tensors only (a CPU tensor fails: "No backend type associated with
    # device type cpu"); gloo takes CPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
