"""Loading a configuration: YAML in, `section.field=value` overrides, typed fields, then checks."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import List, Optional

import yaml

from .checks import validate
from .schema import Config, ConfigError


def _hint(name, options):
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean `{close[0]}`?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value, tp, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field `{where}` must be a mapping, got {value!r}.")
        return _build(tp, value, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field `{where}` must be a list, got {value!r}.")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field `{where}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config field `{where}` must be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field `{where}` must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config field `{where}` must be a string, got {value!r}.")
        return str(value)
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key `{path}`.{_hint(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def parse_override(text: str):
    """`a.b=value` -> (['a', 'b'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like `section.field=value` (e.g. train.steps=50).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override `{text}`: cannot parse value: {e}") from None
    return key.strip().split("."), value


def _list_index(node: list, part: str, path: List[str], i: int) -> int:
    """`part` as an index into the list at `path[:i]`, or a ConfigError naming the list's length."""
    where = ".".join(path[:i]) or "the config"
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"override `{'.'.join(path)}`: `{where}` is a list; `{part}` must be an index 0-{len(node) - 1}.")
    k = int(part)
    if not 0 <= k < len(node):
        raise ConfigError(f"override `{'.'.join(path)}`: `{where}` has {len(node)} entries (0-{len(node) - 1}); "
                          f"there is no entry {k}. Set the whole list instead ({where}=[...]).")
    return k


def _apply_override(data: dict, path: List[str], value):
    node = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path, i)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override `{'.'.join(path)}`: `{'.'.join(path[:i + 1])}` is not a section.")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, len(path) - 1)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: Optional[List[str]]) -> dict:
    """`section.field=value` overrides applied to a config's dict, in order (in place; returned)."""
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _apply_override(data, keys, value)
    return data


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Read YAML (optional), apply `section.field=value` overrides, validate."""
    data: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file `{path}` does not exist (the presets live in configs/).")
        if os.path.isdir(path):
            presets = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml")))
            raise ConfigError(f"config `{path}` is a directory; name a YAML file in it"
                              + (f" (e.g. {os.path.join(path, presets[0])})" if presets else "") + ".")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file `{path}` is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file `{path}` must hold a mapping of sections (model:, train:, ...).")
    apply_overrides(data, overrides)
    cfg = _build(Config, data)
    if path and not cfg.logging.name:
        cfg.logging.name = os.path.splitext(os.path.basename(path))[0]
    validate(cfg)
    return cfg


def config_from_dict(data: dict, check: bool = True) -> Config:
    """A Config from its to_dict(); `check=False` for a checkpoint's own record (what it was trained
    with, read as it is: its data paths need not exist here)."""
    cfg = _build(Config, data)
    if check:
        validate(cfg)
    return cfg
