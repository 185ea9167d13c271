"""The project's shape, checked: every config key is reachable from YAML and rejected with its key
path when wrong; no loose knobs cross the learner boundary; the packages import each other only
downwards (algorithms, data, models <- rollout <- posttrain) and no module imports itself back."""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml

from posttrain.config import ConfigError, RecipeConfig
from posttrain.schema import apply_overrides, parse_dataclass

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"algorithms": "algorithms", "data": "data", "models": "models", "rollout": "rollout",
            "posttrain": "posttrain"}

# One stage of each kind; the walk below sets each loss kind and optional section in turn.
BASE = yaml.safe_load("""
name: walk
model: {preset: tiny-hybrid}
cluster: {learners: 1}
stages:
  - {name: sft, kind: sft, steps: 2, data: {task: arithmetic, mix: [{task: arithmetic}]}}
  - name: dpo
    kind: dpo
    steps: 2
    data: {task: arithmetic, format: rl}
    pairs: {source: policy}
    loss: {kind: sigmoid}
  - {name: rl, kind: rl, steps: 2, data: {task: needle, format: rl}, loss: {kind: grpo}, correction: {mode: tis}}
""")
# A valid instance of each tagged-union member (custom losses need a function that fits).
VARIANTS = {
    "grpo": {"kind": "grpo"}, "cispo": {"kind": "cispo"},
    "custom_policy": {"kind": "custom", "fn": "posttrain.algorithms:grpo_loss"},
    "sigmoid": {"kind": "sigmoid"}, "robust": {"kind": "robust"}, "ipo": {"kind": "ipo"}, "hinge": {"kind": "hinge"},
    "custom_preference": {"kind": "custom", "fn": "posttrain.algorithms:dpo_loss"},
}


def _load(raw: dict, overrides: list[str] = ()) -> RecipeConfig:
    """What load_recipe does after reading the file: overrides, then the typed parse."""
    return parse_dataclass(RecipeConfig, apply_overrides(raw, list(overrides)), "")


def _at(obj: Any, path: str) -> Any:
    for seg in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        obj = obj[int(seg[1:-1])] if seg.startswith("[") else getattr(obj, seg)
    return obj


def _dataclass_of(tp: Any) -> list[type]:
    """The dataclasses a field type holds directly (one, or a tagged union's members)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if dataclasses.is_dataclass(tp):
        return [tp]
    if typing.get_origin(tp) is Union and args and all(dataclasses.is_dataclass(a) for a in args):
        return args
    return []


def _cases() -> list[tuple[dict, str, Any]]:
    """(raw recipe, key path, field type) of every leaf key of every config class."""
    cases: list[tuple[dict, str, Any]] = []
    seen_classes: set[type] = set()

    def walk(raw: dict, cls: type, path: str, node: dict) -> None:
        seen_classes.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{path}.{f.name}" if path else f.name
            tp = hints[f.name]
            members = _dataclass_of(tp)
            if typing.get_origin(tp) is list and _dataclass_of(typing.get_args(tp)[0]):
                options = _dataclass_of(typing.get_args(tp)[0])
                for i, item in enumerate(node.get(f.name, [])):
                    (cls_i,) = [c for c in options if len(options) == 1
                                or typing.get_args(typing.get_type_hints(c)["kind"])[0] == item["kind"]]
                    walk(raw, cls_i, f"{key}[{i}]", item)
            elif len(members) == 1:
                node.setdefault(f.name, {})
                walk(raw, members[0], key, node[f.name])
            elif members:  # a tagged union: every member, each in its own recipe
                for m in members:
                    kind = typing.get_args(typing.get_type_hints(m)["kind"])[0]
                    for name, variant in VARIANTS.items():
                        if variant["kind"] == kind and (kind != "custom" or name.endswith(
                                "policy" if "policy" in m.__name__.lower() else "preference")):
                            variant_raw = copy.deepcopy(raw)
                            target = _node(variant_raw, key)
                            target.clear()
                            target.update(copy.deepcopy(variant))
                            walk(variant_raw, m, key, target)
            else:
                cases.append((raw, key, tp))

    walk(BASE, RecipeConfig, "", BASE)
    _cases.classes = seen_classes  # type: ignore[attr-defined]
    return cases


def _node(raw: dict, path: str) -> dict:
    node: Any = raw
    for seg in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        node = node[int(seg[1:-1])] if seg.startswith("[") else node.setdefault(seg, {})
    return node


def _wrong(tp: Any) -> Any:
    """A value of the wrong type (or outside a Literal) for a field of type `tp`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is Union:
        return _wrong(args[0])
    if origin is Literal:
        return "not-a-choice"
    if origin in (list, tuple, dict):
        return 7
    if tp is str:
        return [1, 2]
    return "not-a-number" if tp in (int, float) else "not-a-bool"


def _yaml(v: Any) -> str:
    return yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True).strip().removesuffix("...").strip()


CASES = _cases()


def test_the_walk_covers_every_config_class():
    classes = _cases.classes  # type: ignore[attr-defined]
    from posttrain.objectives import CISPOLoss, CorrectionConfig, CustomPolicyLoss, HingeDPOLoss, IPOLoss
    from posttrain.rollout import RewardConfig, RolloutConfig, SamplingConfig

    for cls in (CISPOLoss, CustomPolicyLoss, HingeDPOLoss, IPOLoss, CorrectionConfig, RewardConfig, RolloutConfig,
                SamplingConfig):
        assert cls in classes
    assert len(CASES) > 120


@pytest.mark.parametrize("raw,key,tp", CASES, ids=[f"{k}" for _, k, _ in CASES])
def test_every_key_is_reachable_from_yaml_and_rejected_with_its_path(raw, key, tp):
    base = _load(raw)
    value = _at(base, key)
    if tp is not Any and not dataclasses.is_dataclass(value):
        again = _load(raw, [f"{key}={_yaml(value)}"])  # set explicitly, from YAML text
        assert _at(again, key) == value
    with pytest.raises(ConfigError) as e:
        _load(raw, [f"{key}={_yaml(_wrong(tp))}"])
    assert str(e.value).startswith(f"{key}: "), str(e.value)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    with pytest.raises(ConfigError, match=re.escape(f"{parent + '.' if parent else ''}zzz: unknown key")):
        _load(raw, [f"{parent + '.' if parent else ''}zzz=1"])


def test_every_config_field_says_what_it_is():
    """A one-line doc per field: a comment on (or just above) its line, or its mention in the
    class docstring."""
    missing = []
    for cls in _cases.classes:  # type: ignore[attr-defined]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "kind" or _dataclass_of(hints[f.name]):  # the tag; a section with its own docstring
                continue
            owner = next(c for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))
            lines = inspect.getsource(owner).splitlines()
            at = [i for i, ln in enumerate(lines) if re.match(rf"\s+{f.name}\s*:", ln)]
            documented = f.name in (owner.__doc__ or "") or any(
                "#" in lines[i] or lines[i - 1].strip().startswith("#") for i in at)
            if not documented:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"fields without a doc: {missing}"


def test_value_checks_live_with_the_field():
    msg = {}
    for override in ("stages.rl.loss.kind=cispo", "stages.rl.optim.lr=.nan", "stages.rl.sampling.top_p=1.5",
                     "cluster.address=http//head:6379", "stages.sft.batch.global_size=48"):
        raw = copy.deepcopy(BASE)
        with pytest.raises(ConfigError) as e:
            _load(raw, [override] + (["stages.rl.loss.eps_high=-1"] if "cispo" in override else [])
                  + (["cluster.learners=2", "stages.sft.batch.micro_size=16"] if "global_size" in override else []))
        msg[override.split("=")[0]] = str(e.value)
    assert msg["stages.rl.loss.kind"].startswith("stages[2].loss.eps_high: must be")
    assert msg["stages.rl.optim.lr"].startswith("stages[2].optim.lr: must be a positive finite number")
    assert msg["stages.rl.sampling.top_p"].startswith("stages[2].sampling.top_p: must be in (0, 1]")
    assert msg["cluster.address"].startswith("cluster.address: expected")
    # checked at load time, with the cluster (it used to be a traceback after Ray started)
    assert msg["stages.sft.batch.global_size"].startswith(
        "stages[0].batch.global_size: 48 must be a multiple of batch.micro_size x cluster.learners")


def _numeric(tp: Any) -> Any:
    """int or float for a field of that type (also Optional), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Union and len(args) == 1:
        tp = args[0]
    return tp if tp in (int, float) else None


NUMERIC = [(raw, key, _numeric(tp)) for raw, key, tp in CASES if _numeric(tp) is not None]
SIGNED = {"fallback"}  # the knobs whose domain includes negative numbers (a reward may be < 0)


@pytest.mark.parametrize("raw,key,kind", NUMERIC, ids=[k for _, k, _ in NUMERIC])
def test_every_numeric_key_has_a_domain(raw, key, kind):
    """No numeric knob takes NaN or infinity, and none but SIGNED takes -1 (every count, size,
    rate and bound in the recipe is finite and >= 0): each is rejected with its key path."""
    bad = [".nan", ".inf", "-.inf"] if kind is float else []
    if key.rsplit(".", 1)[-1] not in SIGNED:
        bad.append("-1.0" if kind is float else "-1")
    for value in bad:
        with pytest.raises(ConfigError) as e:
            _load(raw, [f"{key}={value}"])
        assert str(e.value).startswith(f"{key}: "), (value, str(e.value))


# ------------------------------------------------------------------ the learner boundary
def _sources(*folders: str) -> dict[Path, str]:
    return {p: p.read_text() for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def test_no_loose_knobs_cross_the_learner_boundary():
    from posttrain.cluster import LearnerGroup
    from posttrain.learner import Learner

    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, text in _sources("posttrain", "rollout", "models").items()
            for m in re.finditer(r"getattr\((cfg|stage|self\.cfg)\b|\*\*knobs", text)]
    assert not hits, hits
    for cls in (Learner, LearnerGroup):
        for name in ("train_step", "evaluate", "call", "call_rank0"):
            fn = getattr(cls, name, None)
            if fn is None:
                continue
            kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
            assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{cls.__name__}.{name} takes **kwargs"


# ------------------------------------------------------------------------ import graph
def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] != "posttrain":
        parts = ["posttrain"] + parts
    return ".".join(parts)


def _imports(path: Path, text: str) -> set[str]:
    """Every posttrain module `path` imports, at module level or inside functions."""
    me = _module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("posttrain")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("posttrain"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return out


def _graph() -> dict[str, set[str]]:
    sources = _sources(*PACKAGES)
    modules = {_module_name(p): (p, t) for p, t in sources.items()}
    return {m: {d for d in _imports(p, t) if d in modules and d != m} for m, (p, t) in modules.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("algorithms", "data", "models", "rollout") else "posttrain"


ALLOWED = {"algorithms": set(), "data": set(), "models": set(), "rollout": {"models", "data"},
           "posttrain": {"algorithms", "data", "models", "rollout"}}


def test_packages_import_only_downwards():
    bad = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps
                 if _package(d) != _package(m) and _package(d) not in ALLOWED[_package(m)])
    assert not bad, bad


def test_no_import_cycles_between_modules():
    """Function-level imports included (they hide a cycle, they do not remove it). An import of a
    package counts as imports of what its __init__ re-exports."""
    graph = _graph()
    packages = {m for m in graph if any(o.startswith(m + ".") for o in graph)}

    def expand(m: str, seen: frozenset = frozenset()) -> set[str]:
        if m not in packages:
            return {m}
        return {x for d in graph[m] - seen for x in expand(d, seen | {m})}

    modules = {m: {x for d in deps for x in expand(d)} - {m} for m, deps in graph.items() if m not in packages}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in modules[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles


def _vllm_imports(tree: ast.AST) -> list[ast.stmt]:
    return [n for n in ast.walk(tree) if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "vllm" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "vllm" and not n.level)]


def test_vllm_is_imported_only_by_its_engine_and_plugin_and_only_inside_functions():
    """posttrain works without vLLM: only rollout/vllm_engine.py and rollout/vllm_plugin.py name
    it, and only in function bodies (importing either module never needs vLLM)."""
    users, top_level = set(), []
    for folder in PACKAGES.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            found = _vllm_imports(tree)
            if not found:
                continue
            users.add(str(path.relative_to(ROOT)))
            inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in _vllm_imports(f)}
            top_level += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in found if id(n) not in inside]
    assert users <= {"rollout/vllm_engine.py", "rollout/vllm_plugin.py"}, users
    assert not top_level, top_level
