"""Dict -> frozen dataclass conversion with errors that name the key path.

Supported field types: bool, int, float, str, Optional[X], Literal[...], list[X],
tuple[X, ...] / tuple[X, Y], dict[str, Any], nested dataclasses, and Unions of dataclasses
that carry a `kind: Literal[...]` field (dispatched on the mapping's `kind` key).

Value checks live with the fields: a config class's `__post_init__` raises
`ValueError("<field>: <problem>")` (or "<field>.<sub>: ..." for a nested one), and this
module reports it under the class's key path, e.g. `stages[2].loss.eps_high: must be ...`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe problem, reported before any expensive work starts (CLI exit code 2)."""


def _show(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    where = path or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{_join(path, str(key))}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = parse_value(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required value missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a field's own check (see the module docstring)
        raise ConfigError(_join(path, str(e))) from None


def parse_value(tp: Any, v: Any, path: str) -> Any:  # noqa: C901 - one branch per type form
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin is Union:
        non_none = [a for a in args if a is not type(None)]
        if v is None and len(non_none) < len(args):
            return None
        if len(non_none) > 1 and all(dataclasses.is_dataclass(a) for a in non_none):
            return _parse_tagged(non_none, v, path)
        return parse_value(non_none[0], v, path)
    if origin is Literal:
        if v not in args or isinstance(v, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{path}: expected one of {', '.join(_show(a) for a in args)}, got {_show(v)}")
        return v
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, v, path)
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{path}: expected a list, got {_show(v)}")
        return [parse_value(args[0], x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_show(v)}")
        types = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(types) != len(v):
            raise ConfigError(f"{path}: expected {len(types)} values, got {len(v)}")
        return tuple(parse_value(t, x, f"{path}[{i}]") for i, (t, x) in enumerate(zip(types, v)))
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(v)}")
        return {str(k): parse_value(args[1], x, _join(path, str(k))) for k, x in v.items()}
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{path}: expected an integer, got {_show(v)}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string; accept numeric strings
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_show(v)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{path}: expected a string, got {_show(v)}")
        return v
    raise TypeError(f"schema: unsupported field type {tp!r} at {path}")  # a programming error


def _parse_tagged(options: list[type], v: Any, path: str) -> Any:
    kinds = {typing.get_args(typing.get_type_hints(c)["kind"])[0]: c for c in options}
    if not isinstance(v, dict):
        raise ConfigError(f"{path}: expected a mapping, got {_show(v)}")
    if "kind" not in v:
        raise ConfigError(f"{path}.kind: required value missing (one of {', '.join(map(repr, kinds))})")
    if v["kind"] not in kinds:
        raise ConfigError(f"{path}.kind: expected one of {', '.join(map(repr, kinds))}, got {_show(v['kind'])}")
    return parse_dataclass(kinds[v["kind"]], v, path)


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML) to a copy of the raw recipe.

    List items are addressed by index (`stages.0.steps` or `stages[0].steps`) or, for
    lists of mappings with a `name`, by name (`stages.sft.steps`).
    """
    import copy

    raw = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected KEY=VALUE, e.g. stages.0.optim.lr=1e-4")
        key, value = ov.split("=", 1)
        segments = [m.group(1) or m.group(2) for m in _SEGMENT.finditer(key)]
        if not segments:
            raise ConfigError(f"override {ov!r}: empty key")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node: Any = raw
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            shown = ".".join(segments[: i + 1])
            if isinstance(node, list):
                idx = _list_index(node, seg, shown)
                if last:
                    node[idx] = parsed
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[seg] = parsed
                else:
                    node = node.setdefault(seg, {})
            else:
                raise ConfigError(f"override {ov!r}: {shown} is not a mapping or list")
    return raw


def _list_index(node: list, seg: str, shown: str) -> int:
    if seg.isdigit():
        if int(seg) >= len(node):
            raise ConfigError(f"override: {shown}: index out of range (list has {len(node)} items)")
        return int(seg)
    for j, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == seg:
            return j
    raise ConfigError(f"override: {shown}: no list item named {seg!r}")
