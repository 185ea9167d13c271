"""Typed recipe configuration: one small frozen dataclass per component.

A recipe is YAML; `load_recipe` turns it into a `RecipeConfig` or raises `ConfigError`
naming the key path (`stages[0].optim.lr: expected a number, got "fast"`). Everything is
checked here, before Ray or any model starts: unknown keys (with a did-you-mean), types,
required values, and that every file the recipe names exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from posttrain.schema import ConfigError, apply_overrides, parse_dataclass

__all__ = [
    "ConfigError", "ModelConfig", "TokenizerConfig", "ClusterConfig", "DataConfig",
    "OptimConfig", "ScheduleConfig", "BatchConfig", "EvalConfig", "CheckpointConfig",
    "LearnerConfig", "SFTStageConfig", "RLStageConfig", "RLSamplingConfig", "RLRolloutConfig", "RLLossConfig",
    "RLFilterConfig", "RLRewardConfig", "StageConfig", "RecipeConfig", "load_recipe",
    "PairsConfig", "DPOLossConfig", "DPOStageConfig",
    "recipe_path",
]


@dataclass(frozen=True)
class ModelConfig:
    """Which model a run starts from.

    Exactly one of `preset` (a tiny architecture built from scratch, see posttrain.models)
    or `path` (a Hugging Face causal-LM directory on disk) is set. `overrides` replaces keys
    of the preset's transformers config (e.g. `num_hidden_layers: 16`).
    """

    preset: Optional[str] = None
    path: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fp32_lm_head: bool = True
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """`char`: a character-level tokenizer built with the `tokenizers` library (digits are
    single tokens, which the arithmetic tasks need); `path`: a saved HF tokenizer dir."""

    kind: Literal["char", "path"] = "char"
    path: Optional[str] = None


@dataclass(frozen=True)
class ClusterConfig:
    """Where the processes run. `address: null` starts a local Ray instance."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    learners: int = 1  # DeepSpeed data-parallel world size
    rollout_workers: int = 1
    cpus_per_learner: float = 1.0
    cpus_per_rollout_worker: float = 0.0
    # torch intra-op threads in each learner and rollout process. 1 by default: learners and
    # workers share the machine, and oversubscribed OpenMP threads spin - a tiny-model SFT
    # step measured 0.27 s with 1 thread and 2.4 s with 2 on a busy 2-core machine.
    torch_threads: int = 1


@dataclass(frozen=True)
class MixSource:
    """Extra supervised data mixed into an sft stage's training examples, e.g. the short-
    context task kept in a long-context stage so that it is not forgotten (MiniMax-01 mixes
    short data into its long-context stages). A synthetic `task` (its sft_train file) or a
    `train` file in `format`; `max_examples` keeps the first N (default: all). The examples
    are tokenised and packed with the stage's own settings; the stage's eval is unchanged."""

    task: Optional[str] = None
    task_args: dict[str, Any] = field(default_factory=dict)
    train: Optional[str] = None
    format: Literal["prompt_completion", "chat"] = "prompt_completion"
    max_examples: Optional[int] = None


@dataclass(frozen=True)
class DataConfig:
    """A stage's data: files on disk, or a synthetic task written to the run dir first.

    With `task`, the task's generator writes its files under `<run_dir>/data/<task>/` and
    `train`/`eval` default to that task's files for the stage kind; the same loading path
    as user data is used afterwards.
    """

    train: Optional[str] = None
    eval: Optional[str] = None
    format: Literal["prompt_completion", "chat", "preference", "rl"] = "prompt_completion"
    task: Optional[str] = None
    task_args: dict[str, Any] = field(default_factory=dict)
    on_bad_row: Literal["error", "skip"] = "error"
    max_seq_len: int = 512
    # sft and dpo: pack tokenised examples (dpo: each micro-batch's chosen and rejected
    # documents) into rows of max_seq_len (best-fit decreasing, documents never mixed);
    # sft's pack_mode "split" cuts longer examples into pieces instead of truncating
    pack: bool = False
    pack_mode: Literal["bfd", "split"] = "bfd"
    # sft only: more training sources mixed in (see MixSource)
    mix: list[MixSource] = field(default_factory=list)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. MiniMax-M1 used betas (0.9, 0.95) and eps 1e-15 for RL."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class BatchConfig:
    """Sequences per optimizer step (across all learners) and per micro-batch.

    With `data.pack` in an sft stage the unit is a packed row of up to data.max_seq_len tokens
    instead of a sequence: global_size rows per step (<= global_size x max_seq_len tokens) and
    micro_size must be 1 (one packed row per micro-batch bounds the activation memory). In a
    dpo stage both count pairs; a micro-batch's pairs are packed into rows, one forward each."""

    global_size: int = 32
    micro_size: int = 8


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # optimizer steps between evals; 0: only at the end of the stage
    max_new_tokens: int = 16
    limit: Optional[int] = None  # evaluate on the first N eval rows


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # optimizer steps between resumable checkpoints; 0: only at stage end
    keep_last: int = 1


@dataclass(frozen=True)
class LearnerConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    loss_chunk_size: int = 1024  # tokens per chunk of the LM-head cross-entropy
    gradient_checkpointing: Optional[bool] = None  # recompute layer activations; null: model.gradient_checkpointing


@dataclass(frozen=True)
class SFTStageConfig:
    name: str
    kind: Literal["sft"]
    data: DataConfig
    steps: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    init_from: Optional[str] = None  # a previous stage's name; default: the previous stage
    log_every: int = 1
    # model config keys set when this stage's learners load their starting checkpoint, on top
    # of model.overrides (long context: {rope_parameters: {rope_type: default, rope_theta: 1.0e7}})
    model_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RLSamplingConfig:
    """How each prompt's group is sampled (posttrain.rollout.SamplingParams). group_size is
    GRPO's G; early_stop_run enables MiniMax-M1's early truncation of repetitive runs."""

    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    early_stop_run: Optional[int] = None
    early_stop_prob: float = 0.99


@dataclass(frozen=True)
class RLRolloutConfig:
    """Rollout workers (cluster.rollout_workers of them). engine null: "native" for our hybrid
    models, "hf" otherwise. prompts_per_step: prompts of one rollout batch (before filters)."""

    prompts_per_step: int = 16
    engine: Optional[Literal["hf", "native"]] = None
    max_slots: int = 64
    weight_bucket_mb: float = 64.0
    sampling: RLSamplingConfig = field(default_factory=RLSamplingConfig)


@dataclass(frozen=True)
class RLLossConfig:
    """The policy loss (posttrain.algorithms): kind grpo (clip_low/clip_high, aggregation,
    kl_*, ratio_level, neg_adv_drop_ratio) or cispo (eps_high, eps_low). advantage_scale:
    group / batch / none (Dr. GRPO). correction: TIS/MIS weight for the rollout-vs-learner
    mismatch (null: off). kl_coef > 0 loads a frozen reference policy (the stage's init)."""

    kind: Literal["grpo", "cispo"] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    eps_high: float = 4.0
    eps_low: Optional[float] = None
    aggregation: Literal["seq_mean", "token_mean", "fixed_len"] = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3", "prob"] = "k3"
    ratio_level: Literal["token", "sequence"] = "token"
    neg_adv_drop_ratio: Optional[float] = None
    advantage_scale: Literal["group", "batch", "none"] = "group"
    correction: Optional[Literal["tis", "mis"]] = None
    correction_level: Literal["token", "sequence"] = "token"
    correction_high: float = 2.0
    correction_low: Optional[float] = None


@dataclass(frozen=True)
class RLFilterConfig:
    """DAPO rollout filters. dynamic_sampling drops groups whose rewards are all equal and
    samples up to max_extra_rounds more prompt batches to refill; overlong_cache > 0 turns on
    the soft overlong penalty over the last overlong_cache tokens of max_new_tokens;
    mask_truncated zeroes the loss of completions cut by the length budget."""

    dynamic_sampling: bool = True
    max_extra_rounds: int = 2
    overlong_cache: int = 0
    overlong_penalty: float = 1.0
    mask_truncated: bool = False


@dataclass(frozen=True)
class RLRewardConfig:
    """fn: a posttrain.rollout.REWARDS name (exact_match, numeric, math, format) or
    'module:function'. A call that raises or exceeds timeout_s scores `fallback` (counted)."""

    fn: str = "exact_match"
    timeout_s: float = 10.0
    fallback: float = 0.0
    num_workers: int = 4
    executor: Literal["thread", "process"] = "thread"


@dataclass(frozen=True)
class RLStageConfig:
    """Online RL (GRPO / CISPO). One step = one rollout batch -> `updates_per_batch` optimizer
    steps (the batch split into that many mini-batches) -> one weight sync."""

    name: str
    kind: Literal["rl"]
    data: DataConfig
    steps: int
    rollout: RLRolloutConfig = field(default_factory=RLRolloutConfig)
    loss: RLLossConfig = field(default_factory=RLLossConfig)
    filters: RLFilterConfig = field(default_factory=RLFilterConfig)
    reward: RLRewardConfig = field(default_factory=RLRewardConfig)
    updates_per_batch: int = 1
    micro_size: int = 32  # sequences per learner micro-batch
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="constant"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    init_from: Optional[str] = None
    log_every: int = 1


def _validate_rl(st: RLStageConfig, key: str) -> None:
    s, lo, f = st.rollout.sampling, st.loss, st.filters
    checks = [
        (st.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1"),
        (s.group_size >= 2, "rollout.sampling.group_size", "must be >= 2 (group advantages need 2 samples)"),
        (s.temperature > 0, "rollout.sampling.temperature", "must be > 0 for RL sampling"),
        (s.max_new_tokens >= 1, "rollout.sampling.max_new_tokens", "must be >= 1"),
        (st.updates_per_batch >= 1, "updates_per_batch", "must be >= 1"),
        (st.micro_size >= 1, "micro_size", "must be >= 1"),
        (st.optim.lr > 0, "optim.lr", f"must be positive, got {st.optim.lr}"),
        (lo.kl_coef >= 0, "loss.kl_coef", "must be >= 0"),
        (lo.kind != "cispo" or lo.kl_coef == 0, "loss.kl_coef", "CISPO has no KL term (set 0 or use kind grpo)"),
        (f.max_extra_rounds >= 0, "filters.max_extra_rounds", "must be >= 0"),
        (0 <= f.overlong_cache <= s.max_new_tokens, "filters.overlong_cache",
         f"must be in [0, rollout.sampling.max_new_tokens={s.max_new_tokens}]"),
        (st.data.format == "rl", "data.format", f"must be 'rl' for an rl stage, got {st.data.format!r}"),
    ]
    for ok, sub, msg in checks:
        if not ok:
            raise ConfigError(f"{key}.{sub}: {msg}")
    from posttrain.rollout.rewards import REWARDS

    if st.reward.fn not in REWARDS and ":" not in st.reward.fn:
        raise ConfigError(f"{key}.reward.fn: {st.reward.fn!r} is neither a built-in reward "
                          f"({', '.join(sorted(REWARDS))}) nor 'module:function'")


@dataclass(frozen=True)
class PairsConfig:
    """Where a `dpo` stage's preference pairs come from.

    `file`: data.train (and optionally data.eval) are preference datasets (prompt/chosen/
    rejected, strings or chat messages; data.format: preference).
    `policy`: data.train is a prompt file with answers (data.format: rl; default: the task's
    prompts.jsonl); the stage's starting model samples `num_samples` completions per prompt,
    `reward` (a posttrain.rollout.rewards name or 'module:function') scores them, and the best
    vs the worst completion of each prompt becomes a pair (prompts whose samples all score
    the same are dropped). Generated pairs are saved in the stage dir and reused on resume.
    Held-out pairs: data.eval if given, else the last `eval_fraction` of the pairs.
    """

    source: Literal["file", "policy"] = "file"
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    reward: str = "exact_match"
    num_prompts: Optional[int] = None  # use the first N prompts (default: all)
    eval_fraction: float = 0.1
    max_slots: int = 64  # rollout engine decode slots


@dataclass(frozen=True)
class DPOLossConfig:
    """posttrain.algorithms.dpo_loss knobs; rpo_alpha > 0 adds the NLL of the chosen response (RPO)."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0


@dataclass(frozen=True)
class DPOStageConfig:
    """Offline DPO. `batch` sizes count pairs (each pair is two sequences). `task_eval`: an
    rl-format file (prompt + answer) for the exact-match eval; default: data.task's rl_eval."""

    name: str
    kind: Literal["dpo"]
    data: DataConfig
    steps: int
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    task_eval: Optional[str] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    init_from: Optional[str] = None
    log_every: int = 1


def _validate_dpo(st: DPOStageConfig, key: str) -> None:
    p, lo, d = st.pairs, st.loss, st.data
    want_format = "preference" if p.source == "file" else "rl"
    smoothing_ok = {"sigmoid": 0 <= lo.label_smoothing <= 0.5, "robust": 0 <= lo.label_smoothing < 0.5,
                    "ipo": lo.label_smoothing == 0, "hinge": lo.label_smoothing == 0}[lo.loss_type]
    checks = [
        (d.format == want_format, "data.format",
         f"must be {want_format!r} for a dpo stage with pairs.source={p.source}, got {d.format!r}"),
        (p.source == "policy" or d.train is not None, "data.train",
         "pairs.source=file needs a preference file in data.train (tasks ship prompts, not pairs)"),
        (p.num_samples >= 2, "pairs.num_samples", f"must be >= 2 (best vs worst), got {p.num_samples}"),
        (p.temperature > 0, "pairs.temperature", f"must be > 0 (greedy samples are all equal), got {p.temperature}"),
        (0 < p.top_p <= 1, "pairs.top_p", f"must be in (0, 1], got {p.top_p}"),
        (p.max_new_tokens >= 1, "pairs.max_new_tokens", f"must be >= 1, got {p.max_new_tokens}"),
        (p.num_prompts is None or p.num_prompts >= 1, "pairs.num_prompts", f"must be >= 1, got {p.num_prompts}"),
        (0 <= p.eval_fraction < 1, "pairs.eval_fraction", f"must be in [0, 1), got {p.eval_fraction}"),
        (p.max_slots >= 1, "pairs.max_slots", f"must be >= 1, got {p.max_slots}"),
        (lo.beta > 0, "loss.beta", f"must be > 0, got {lo.beta}"),
        (smoothing_ok, "loss.label_smoothing",
         f"{lo.label_smoothing} is out of range for loss_type {lo.loss_type} "
         "(sigmoid: [0, 0.5], robust: [0, 0.5), ipo/hinge: 0)"),
        (lo.rpo_alpha >= 0, "loss.rpo_alpha", f"must be >= 0, got {lo.rpo_alpha}"),
        (st.task_eval is None or Path(st.task_eval).exists(), "task_eval", f"file not found: {st.task_eval}"),
    ]
    for ok, sub, msg in checks:
        if not ok:
            raise ConfigError(f"{key}.{sub}: {msg}")
    if p.source == "policy":
        from posttrain.rollout.rewards import resolve_reward

        try:
            resolve_reward(p.reward)
        except ValueError as e:
            raise ConfigError(f"{key}.pairs.reward: {e}") from None


# Stage kinds are chosen by their `kind` key (see posttrain.schema's union handling).
StageConfig = Union[SFTStageConfig, RLStageConfig, DPOStageConfig]


@dataclass(frozen=True)
class RecipeConfig:
    name: str
    model: ModelConfig
    stages: list[StageConfig]
    seed: int = 0
    run_dir: Optional[str] = None  # default: runs/<name>
    resume: bool = False
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a recipe shipped in posttrain.recipes."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    shipped = Path(__file__).resolve().parent.parent / "recipes"
    try:  # installed package: posttrain.recipes
        import posttrain.recipes as _r

        shipped = Path(_r.__file__).parent
    except ImportError:  # pragma: no cover - source checkout without install
        pass
    candidate = shipped / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(q.stem for q in shipped.glob("*.yaml"))
        raise ConfigError(f"no recipe file or shipped recipe named {name_or_path!r} (shipped: {', '.join(names)})")
    return candidate


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> RecipeConfig:
    """Read, override, type-check and validate a recipe; raises ConfigError."""
    import yaml

    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping at the top level")
    raw = apply_overrides(raw, list(overrides))
    cfg = parse_dataclass(RecipeConfig, raw, "")
    _validate(cfg)
    return cfg


def _validate(cfg: RecipeConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    m = cfg.model
    if (m.preset is None) == (m.path is None):
        raise ConfigError("model: set exactly one of model.preset or model.path")
    if m.path is not None and not Path(m.path).is_dir():
        raise ConfigError(f"model.path: directory not found: {m.path}")
    if m.preset is not None:
        from posttrain.models import PRESETS

        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {m.preset!r} (known: {', '.join(sorted(PRESETS))})")
    t = cfg.tokenizer
    if t.kind == "path":
        if not t.path or not Path(t.path).is_dir():
            raise ConfigError(f"tokenizer.path: directory not found: {t.path}")
    if not cfg.stages:
        raise ConfigError("stages: at least one stage is required")
    names: list[str] = []
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if st.name in names:
            raise ConfigError(f"{key}.name: duplicate stage name {st.name!r}")
        if st.init_from is not None and st.init_from not in names:
            raise ConfigError(f"{key}.init_from: {st.init_from!r} is not an earlier stage (earlier: {names or 'none'})")
        names.append(st.name)
        _validate_stage(st, key)


def _validate_mix(src: MixSource, key: str, is_sft: bool) -> None:
    if not is_sft:
        raise ConfigError(f"{key}: only sft stages mix data sources")
    if (src.task is None) == (src.train is None):
        raise ConfigError(f"{key}: set exactly one of task (a synthetic task) or train (a file)")
    if src.task is not None:
        from posttrain.data import TASKS

        if src.task not in TASKS:
            raise ConfigError(f"{key}.task: unknown task {src.task!r} (known: {', '.join(sorted(TASKS))})")
    if src.train is not None and not Path(src.train).exists():
        raise ConfigError(f"{key}.train: file not found: {src.train}")
    if src.max_examples is not None and src.max_examples <= 0:
        raise ConfigError(f"{key}.max_examples: must be positive, got {src.max_examples}")


def _validate_stage(st: SFTStageConfig, key: str) -> None:
    d = st.data
    if d.task is None and d.train is None:
        raise ConfigError(f"{key}.data: set data.train (a file) or data.task (a synthetic task)")
    if d.task is not None:
        from posttrain.data import TASKS

        if d.task not in TASKS:
            raise ConfigError(f"{key}.data.task: unknown task {d.task!r} (known: {', '.join(sorted(TASKS))})")
    for k in ("train", "eval"):
        p = getattr(d, k)
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{key}.data.{k}: file not found: {p}")
    if st.steps <= 0:
        raise ConfigError(f"{key}.steps: must be positive, got {st.steps}")
    for j, src in enumerate(d.mix):
        _validate_mix(src, f"{key}.data.mix[{j}]", isinstance(st, SFTStageConfig))
    if d.pack and not isinstance(st, (SFTStageConfig, DPOStageConfig)):
        raise ConfigError(f"{key}.data.pack: only sft and dpo stages pack their data")
    if d.pack and isinstance(st, DPOStageConfig) and d.pack_mode != "bfd":
        raise ConfigError(f"{key}.data.pack_mode: dpo packs whole documents (bfd); a preference "
                          f"response is never split, got {d.pack_mode!r}")
    if d.pack and isinstance(st, SFTStageConfig) and st.batch.micro_size != 1:
        raise ConfigError(f"{key}.batch.micro_size: must be 1 with data.pack (one packed row of "
                          f"data.max_seq_len tokens per micro-batch), got {st.batch.micro_size}")
    if isinstance(st, DPOStageConfig):
        _validate_dpo(st, key)
    if isinstance(st, RLStageConfig):  # no `batch`: an RL batch is prompts_per_step x group_size
        _validate_rl(st, key)
        return
    b = st.batch
    if b.micro_size <= 0 or b.global_size <= 0 or b.global_size % b.micro_size:
        raise ConfigError(f"{key}.batch: global_size ({b.global_size}) must be a positive multiple of micro_size ({b.micro_size})")
    if st.optim.lr <= 0:
        raise ConfigError(f"{key}.optim.lr: must be positive, got {st.optim.lr}")
