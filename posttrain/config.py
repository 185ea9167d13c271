"""The recipe: one typed tree of the components' own configs, loaded and checked at once.

A recipe is YAML; `load_recipe` turns it into a `RecipeConfig` or raises `ConfigError` naming
the key path (`stages[0].optim.lr: expected a number, got "fast"`). Each section is the config
class of the component that uses it, defined beside that component and embedded here (never
copied):

    model        posttrain.models.ModelConfig            models/config.py
    tokenizer    posttrain.data.TokenizerConfig          data/tokenizer.py
    cluster      posttrain.cluster.ClusterConfig         posttrain/cluster.py
    stages[i]    a kind of posttrain.stages.STAGES       posttrain/stages/<kind>.py
      data       posttrain.data.DataConfig               data/config.py
      optim, schedule, learner                           posttrain/learner.py
      eval       posttrain.evals.EvalConfig; checkpoint  posttrain/checkpoint.py
      sampling, rollout, reward                          rollout/types.py, worker.py, rewards.py
      loss       a tagged union of the objective's loss kinds   posttrain/objectives/{rl,dpo}.py
      lora       posttrain.lora.LoRAConfig (null: full fine-tuning)  posttrain/lora.py

Everything is checked here, before Ray or any model starts: unknown keys (with a
did-you-mean), types, required values, each field's domain (the classes' __post_init__),
cross-field and cluster-dependent checks, that files and modules the recipe names exist, that
a lora block's target modules exist in the model, that each rollout engine can serve the model
(native needs our hybrid; hf's cuda_graphs: true a model transformers compiles whole).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from posttrain.checkpoint import CheckpointConfig
from posttrain.cluster import ClusterConfig
from posttrain.data import DataConfig, MixSource, TokenizerConfig
from posttrain.evals import EvalConfig
from posttrain.learner import LearnerConfig, OptimConfig, ScheduleConfig
from posttrain.lora import LoRAConfig, check_targets
from posttrain.models import ModelConfig
from posttrain.schema import ConfigError, apply_overrides, parse_dataclass
from posttrain.stages import STAGES, AnyStageConfig
from posttrain.stages.common import BatchConfig
from posttrain.stages.dpo import DPOStageConfig
from posttrain.stages.dpo_pairs import PairsConfig
from posttrain.stages.rl import RLStageConfig
from posttrain.stages.sft import SFTStageConfig

# The recipe's sections, importable from here as one index of the schema (each is defined
# beside the component that uses it).
__all__ = [
    "ConfigError", "RecipeConfig", "load_recipe", "recipe_path", "STAGES",
    "ModelConfig", "TokenizerConfig", "ClusterConfig", "DataConfig", "MixSource", "OptimConfig", "ScheduleConfig",
    "LearnerConfig", "EvalConfig", "CheckpointConfig", "BatchConfig", "SFTStageConfig", "DPOStageConfig",
    "PairsConfig", "RLStageConfig", "LoRAConfig",
]


@dataclass(frozen=True)
class RecipeConfig:
    """A whole run: the model, its tokenizer, where processes run, and the stages in order."""

    name: str  # the run's name (default run_dir: runs/<name>)
    model: ModelConfig
    stages: list[AnyStageConfig]
    seed: int = 0  # model init, task files, batch order, sampling: everything derives from it
    run_dir: Optional[str] = None  # default: runs/<name>
    resume: bool = False  # continue the run in run_dir (as --resume)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"name: must be a plain name (it names the default run_dir runs/<name>), got {self.name!r}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        _run_dir_ok(self.resolved_run_dir)
        if not self.stages:
            raise ValueError("stages: at least one stage is required")
        names: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in names:
                raise ValueError(f"stages[{i}].name: duplicate stage name {st.name!r}")
            if st.init_from is not None and st.init_from not in names:
                raise ValueError(f"stages[{i}].init_from: {st.init_from!r} is not an earlier stage "
                                 f"(earlier: {names or 'none'})")
            names.append(st.name)
            try:
                self.model.check_overrides(st.model_overrides)
            except ValueError as e:
                raise ValueError(f"stages[{i}].model_overrides.{e}") from None
            try:
                st.check_cluster(self.cluster)
                if st.lora is not None:
                    self._check_lora(st)
                self._check_engines(st)
            except ValueError as e:
                raise ValueError(f"stages[{i}].{e}") from None
        # last: the slowest check (every row of every local file), once the rest is known good
        for i, st in enumerate(self.stages):
            try:
                st.check_files()
            except ValueError as e:
                raise ValueError(f"stages[{i}].{e}") from None

    def _check_engines(self, stage: AnyStageConfig) -> None:
        """Each rollout engine of the stage can serve the model (an rl stage's workers; a dpo
        stage's policy-sampled pairs), so a mismatch is a load error, not a worker's crash."""
        from posttrain.models import meta_model, model_type
        from posttrain.rollout.worker import check_engine

        engines = []
        if isinstance(stage, RLStageConfig):
            engines.append(("rollout", stage.rollout))
        if isinstance(stage, DPOStageConfig) and stage.pairs.source == "policy":
            engines.append(("pairs.rollout", stage.pairs.rollout))
        if not engines:
            return
        model = self.model.with_overrides(stage.model_overrides)
        minimax = model_type(model) == "minimax"
        compiles = lambda: bool(getattr(type(meta_model(model)), "_can_compile_fullgraph", False))  # noqa: E731
        for key, rollout in engines:
            try:
                check_engine(rollout, minimax, compiles)
            except ValueError as e:
                raise ValueError(f"{key}.{e}") from None

    def _check_lora(self, stage: AnyStageConfig) -> None:
        """A LoRA block's targets exist in the model (its layer names from a meta-device copy: no
        weights); continue_adapter follows a LoRA stage with the same block."""
        from posttrain.models import meta_model

        assert stage.lora is not None
        try:
            check_targets(stage.lora, meta_model(self.model.with_overrides(stage.model_overrides)))
        except ValueError as e:
            raise ValueError(f"lora.{e}") from None
        if stage.lora.continue_adapter:
            i = next(j for j, s in enumerate(self.stages) if s is stage)
            source = stage.init_from or (self.stages[i - 1].name if i else None)
            prev = next((s for s in self.stages if s.name == source), None)
            if prev is None or prev.lora is None or not stage.lora.same_adapter(prev.lora):
                raise ValueError(f"lora.continue_adapter: the stage this one starts from ({source or 'none'}) must "
                                 f"train an adapter with the same lora block (rank, alpha, targets, ...)")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def _run_dir_ok(run_dir: Path) -> None:
    """run_dir is a directory or can become one: not a file, not under a file, a name the file
    system takes. (Whether an existing directory may be used depends on --resume/--overwrite:
    posttrain.pipeline.prepare_run_dir.)"""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"run_dir: {run_dir} is a file, not a directory")
        for parent in run_dir.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"run_dir: {run_dir} is inside {parent}, which is a file")
                break
    except OSError as e:  # e.g. a name longer than the file system allows
        raise ValueError(f"run_dir: {e.strerror}: {run_dir}") from None


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a recipe shipped in posttrain.recipes."""
    p = Path(name_or_path)
    try:
        is_path = p.suffix in (".yaml", ".yml") or p.exists()
        is_file = p.is_file()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise ConfigError(f"recipe {name_or_path}: {e.strerror}") from None
    if is_path:
        if not is_file:
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
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping at the top level")
    raw = apply_overrides(raw, list(overrides))
    return parse_dataclass(RecipeConfig, raw, "")


def _yaml_problem(e: Exception) -> str:
    """One line from a YAML error (its str() spans several lines with a source excerpt)."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        where = f"line {e.problem_mark.line + 1} column {e.problem_mark.column + 1}"
        return f"{e.problem} ({where})" + (f", {e.context}" if e.context else "")
    return " ".join(str(e).split())
