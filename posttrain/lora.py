"""LoRA adapters (the `peft` library) on a stage's model: the recipe's `stages[i].lora:`.

A stage with a `lora:` block trains low-rank adapters on its starting weights instead of the
weights themselves: `W x + (alpha / rank) * B A x` on each targeted linear layer, B = 0 at the
start, so the stage starts exactly at its starting model. Only adapter parameters (and the
embeddings / LM head when `train_embeddings` / `train_lm_head`) require gradients, so DeepSpeed
keeps optimizer state for them alone; the base weights stay bitwise what was loaded.

What the rest of the code sees (all of it works on plain models too, where it is the identity):
  - `apply_lora(model, cfg, adapter_dir)`: peft injects its layers into `model` in place and
    returns the PeftModel handle (save_pretrained of the adapter). Learners train the injected
    model itself (`handle.get_base_model()`), so objectives see the same module tree as before.
  - `merged_state(model)`: the weights as a plain checkpoint names them, each adapted weight
    merged as `W + get_delta_weight()` (peft's B A scaling) on demand, never in place (merging
    in place and back would not restore W bitwise). Weight sync and the merged checkpoint read
    this view; `changing` marks the tensors training can change (what a sync sends again).
  - `adapter_disabled(model)`: a block in which the model computes its base weights (peft's
    enable_adapters(False) on every adapter layer). DPO's reference log-probs and the rl KL
    reference come from it: no second model in memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from posttrain.zero3 import own_gathers

# Attention projections of our hybrid (lightning: qkv_proj, output_gate, out_proj; softmax:
# q/k/v/o_proj) and of most Hugging Face decoders (q/k/v/o_proj, fused qkv_proj); `targets: null`
# adapts those the model has.
DEFAULT_TARGETS = ("qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("w1", "w2", "w3")  # our hybrid's MoE experts (transformers' fused experts are not linear layers)
ADAPTABLE = ("Linear", "Embedding", "Conv1D")  # module classes peft's LoRA adapts


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on a stage's model (null: full fine-tuning). The stage saves the adapter
    (PEFT format) and a merged checkpoint; the next stage starts from the merged one unless it
    sets continue_adapter."""

    rank: int = 16  # r: inner dimension of B A
    alpha: float = 32.0  # the update is (alpha / rank) * B A
    dropout: float = 0.0  # dropout on the adapters' input while training
    targets: Optional[list[str]] = None  # module names, matching a dotted name or its end (peft); null: the attention projections the model has
    target_regex: Optional[str] = None  # instead of targets: a regex matched against whole dotted module names
    experts: bool = False  # also adapt the MoE experts' w1/w2/w3 (with the default targets)
    train_embeddings: bool = False  # train the input embeddings fully (saved with the adapter)
    train_lm_head: bool = False  # train the LM head fully (saved with the adapter)
    continue_adapter: bool = False  # keep training the adapter of the stage this one starts from (same lora block) instead of a fresh one on its merged weights

    def __post_init__(self) -> None:
        checks = [
            (self.rank >= 1, "rank", f"must be >= 1, got {self.rank}"),
            (math.isfinite(self.alpha) and self.alpha > 0, "alpha", f"must be a finite number > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}"),
            (self.targets is None or (len(self.targets) > 0 and all(self.targets)), "targets",
             f"must be null or a list of non-empty module names, got {self.targets}"),
            (self.targets is None or self.target_regex is None, "target_regex", "set targets or target_regex, not both"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as e:
                raise ValueError(f"target_regex: not a regular expression ({e}): {self.target_regex!r}") from None

    def same_adapter(self, other: "LoRAConfig") -> bool:
        """Whether a stage with this block can continue an adapter trained with `other`."""
        return dataclasses.replace(self, continue_adapter=False) == dataclasses.replace(other, continue_adapter=False)

    # ------------------------------------------------------------- against a model
    def target_modules(self, modules: Mapping[str, str]) -> list[str] | str:
        """peft's target_modules for a model whose adaptable modules are `modules` (dotted name ->
        class name, see `module_types`). Raises ValueError("<field>: ...") when a target matches
        nothing, naming the modules that exist."""
        names = sorted({n.rsplit(".", 1)[-1] for n in modules})
        head = _head_names(modules)
        if self.target_regex is not None:
            hits = [n for n in modules if re.fullmatch(self.target_regex, n)]
            if not hits:
                example = next(iter(modules), "")
                raise ValueError(f"target_regex: {self.target_regex!r} matches no module (names look like "
                                 f"{example!r}; layer names: {', '.join(names)})")
            found, key = hits, "target_regex"
            chosen: list[str] | str = self.target_regex
        elif self.targets is not None:
            chosen, key = list(self.targets), "targets"
            for t in chosen:
                if not [n for n in modules if _matches(t, n)]:
                    raise ValueError(f"targets: {t!r} matches no module of the model (its layer names: "
                                     f"{', '.join(names)})")
            found = [n for n in modules if any(_matches(t, n) for t in chosen)]
        else:
            chosen, key = [t for t in DEFAULT_TARGETS if any(_matches(t, n) for n in modules)], "targets"
            if not chosen:
                raise ValueError(f"targets: the model has none of the default attention projections "
                                 f"({', '.join(DEFAULT_TARGETS)}); name its layers (layer names: {', '.join(names)})")
            found = []
        if self.experts:
            experts = [t for t in EXPERT_TARGETS if any(_matches(t, n) for n in modules)]
            if not experts or isinstance(chosen, str):
                raise ValueError("experts: " + ("use targets (a list) with experts, or put the experts in target_regex"
                                                if isinstance(chosen, str) else
                                                f"the model has no linear expert layers {EXPERT_TARGETS}"))
            chosen = chosen + [t for t in experts if t not in chosen]
        if any(n in head for n in found):
            raise ValueError(f"{key}: the LM head ({', '.join(head)}) takes no adapter here (the learner reads its "
                             f"weight directly); set train_lm_head to train it")
        return chosen

    def peft_config(self, modules: Mapping[str, str], embeddings: str, lm_head: str) -> Any:
        """The peft.LoraConfig of this block for a model with these adaptable `modules` and
        input-embedding / LM-head module names."""
        from peft import LoraConfig

        to_save = ([embeddings.rsplit(".", 1)[-1]] if self.train_embeddings else []) + (
            [lm_head.rsplit(".", 1)[-1]] if self.train_lm_head else [])
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules(modules), modules_to_save=to_save or None,
                          bias="none")  # no task_type: a plain PeftModel (ours has no generate())


def _matches(target: str, name: str) -> bool:
    """peft's rule for a target_modules entry: the whole dotted name or its last components."""
    return name == target or name.endswith("." + target)


def _head_names(modules: Mapping[str, str]) -> list[str]:
    return [n for n in modules if n.rsplit(".", 1)[-1] == "lm_head"]


def module_types(model: nn.Module) -> dict[str, str]:
    """Dotted name -> class name of every module peft's LoRA can adapt (linear, embedding)."""
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in ADAPTABLE and n}


def check_targets(cfg: LoRAConfig, model: nn.Module) -> None:
    """Raise ValueError("<field>: ...") unless cfg's targets fit `model` (a meta-device copy will do)."""
    cfg.target_modules(module_types(model))


# ------------------------------------------------------------------ on the learner
def apply_lora(model: nn.Module, cfg: LoRAConfig, adapter_dir: Optional[str] = None) -> Any:
    """Inject cfg's adapters into `model` (in place; every other parameter frozen) and return the
    PeftModel handle. adapter_dir: continue that saved adapter (trainable) instead of a fresh one."""
    from peft import PeftModel, get_peft_model

    names = {id(m): n for n, m in model.named_modules()}
    config = cfg.peft_config(module_types(model), names[id(model.get_input_embeddings())],
                             names[id(model.get_output_embeddings())])
    with _experts_as_linear_layers(model):
        if adapter_dir is None:
            return get_peft_model(model, config)
        peft = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    saved = peft.peft_config["default"]
    if (saved.r, saved.lora_alpha, sorted(saved.target_modules)) != (config.r, config.lora_alpha,
                                                                      sorted(config.target_modules)):
        raise ValueError(f"lora.continue_adapter: the adapter in {adapter_dir} has rank {saved.r}, alpha "
                         f"{saved.lora_alpha}, targets {sorted(saved.target_modules)}; this stage asks for "
                         f"{config.r}, {config.lora_alpha}, {sorted(config.target_modules)}")
    return peft


@contextlib.contextmanager
def _experts_as_linear_layers(model: nn.Module) -> Iterator[None]:
    """peft (with transformers 5) rewrites the expert targets w1/w2/w3 of a model_type "minimax"
    model into transformers' fused expert parameters. Our HybridForCausalLM keeps its experts as
    linear layers (the checkpoint layout), so while peft injects into it the config's model_type
    is hidden and the targets stay what they say. (transformers' own MiniMaxForCausalLM, loading
    a saved adapter, gets peft's rewrite as intended.)"""
    from posttrain.models import HybridForCausalLM

    if not isinstance(model, HybridForCausalLM):
        yield
        return
    model.config.model_type = "posttrain-hybrid"  # an instance attribute over the class's "minimax"
    try:
        yield
    finally:
        del model.config.model_type


@own_gathers
def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable parameters, all parameters the learner holds (base + adapters) and the share."""
    from posttrain.zero3 import numel

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return {"trainable": float(trainable), "total": float(total), "trainable_share": trainable / max(total, 1)}


def _adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Dotted name -> peft layer (LoRA layers and fully trained module wrappers) inside `model`."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))}


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of the merged view: `like` has its shape and dtype (for bucketing; a meta
    tensor under ZeRO-3); `get()` computes it (detached, on the model's device). Under ZeRO-3
    `get()` gathers what it reads (posttrain.zero3.whole): every rank must call it, in the same
    order, and it returns a copy."""

    like: torch.Tensor
    get: Callable[[], torch.Tensor]
    changing: bool  # training can change it (what a weight sync sends after the first push)


def merged_state(model: nn.Module) -> dict[str, MergedTensor]:
    """The model's weights under a plain checkpoint's names, adapters merged (see the module
    docstring). For a model without adapters: its state dict, every tensor `changing`."""
    from peft.tuners.lora import LoraLayer

    from posttrain.zero3 import full_like

    state = model.state_dict(keep_vars=True)
    layers = _adapter_layers(model)
    if not layers:
        return {k: MergedTensor(full_like(v), _reader(v), True) for k, v in state.items()}
    out: dict[str, MergedTensor] = {}
    for key, value in state.items():
        owner = _owner(key, layers)
        if owner is None:
            out[key] = MergedTensor(full_like(value), _reader(value), False)
            continue
        layer, rest = layers[owner], key[len(owner) + 1:]
        if isinstance(layer, LoraLayer):
            if rest.startswith("base_layer."):
                name = rest[len("base_layer."):]
                get = (lambda layer=layer, w=value: _merged_weight(layer, w)) if name == "weight" else _reader(value)
                out[f"{owner}.{name}"] = MergedTensor(full_like(value), get, name == "weight")
        else:  # ModulesToSaveWrapper: the active copy under the original name
            prefix = f"modules_to_save.{layer.active_adapters[0]}."
            if rest.startswith(prefix) and not layer.disable_adapters:
                out[f"{owner}.{rest[len(prefix):]}"] = MergedTensor(full_like(value), _reader(value), True)
            elif rest.startswith("original_module.") and layer.disable_adapters:
                out[f"{owner}.{rest[len('original_module.'):]}"] = MergedTensor(full_like(value), _reader(value), True)
    return out


def _reader(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`value.detach`, or under ZeRO-3 a copy of the gathered parameter."""
    from posttrain.zero3 import is_partitioned, whole

    if not is_partitioned(value):
        return value.detach

    def get() -> torch.Tensor:
        with whole([value]):
            return value.detach().clone()

    return get


def _owner(key: str, layers: Mapping[str, nn.Module]) -> Optional[str]:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


@torch.no_grad()
def _merged_weight(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """W + the active adapters' deltas (peft's get_delta_weight: scaling * B A), out of place;
    under ZeRO-3 with the layer's parameters (W, A, B) gathered for the computation."""
    from posttrain.zero3 import whole

    if layer.merged:
        raise RuntimeError("merged_state: adapters merged in place are not supported")
    with whole(layer.parameters()):
        out = weight.detach().clone()
        if not layer.disable_adapters:
            for name in layer.active_adapters:
                if name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {}):
                    out += layer.get_delta_weight(name).to(out.dtype)
    return out


def merged_tensors(model: nn.Module, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, CPU copy) of the listed tensors of the merged view."""
    view = merged_state(model)
    return [(n, view[n].get().to("cpu", copy=True)) for n in names]


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing its base weights for the block (no-op without adapters); the adapters
    (and their requires_grad) come back afterwards, also when the block raises."""
    layers = [m for m in _adapter_layers(model).values() if not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


@dataclass(frozen=True)
class AdapterDisabled:
    """`fn(model, *args)` run with the adapters disabled: what a learner's `call` runs for the
    reference log-probs (a frozen dataclass, so Ray ships it whole)."""

    fn: Callable[..., Any]

    def __call__(self, model: nn.Module, *args: Any) -> Any:
        with adapter_disabled(model):
            return self.fn(model, *args)


class AdapterFreeReference:
    """The rl stage's KL reference when the policy trains adapters: the learners' own weights
    with the adapters disabled (the base the adapter sits on), instead of a second model."""

    def __init__(self, learners: Any):
        self.learners = learners

    def call_rank0(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.learners.call_rank0(AdapterDisabled(fn), *args)

    def shutdown(self) -> None:
        """Nothing to free: the reference is the policy's own base weights."""
