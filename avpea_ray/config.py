"""One typed configuration: dataclasses, overridable from a JSON/YAML file and `key=value` flags.

`load_config(Config, file, overrides)` builds the resolved config; every unknown key, wrong
type or bad value is a `ConfigError` naming the dotted field (`model.reduction_factor`), raised
before any work starts. `to_dict` gives the resolved config that is saved with every run and
checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; the message names the field."""


# -- generic dataclass <-> dict ---------------------------------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key and type.

    Raises:
        ConfigError: an unknown key, a wrong type, or a value its `__post_init__` refuses,
            naming the dotted field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(hint, value, f"{name}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        # JSON overrides accept Infinity and NaN; no setting means either.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


# -- files and command-line overrides ------------------------------------------------------

def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file (.json, .yaml or .yml) as a dict; a clear error if unreadable."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error means the same to the user
        raise ConfigError(f"config file {str(path)!r} is not valid {file.suffix[1:] or 'JSON'}: {err}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.reduction_factor=16` -> (["model", "reduction_factor"], 16).

    The value is read as JSON when it parses (numbers, true/false, lists, quoted strings),
    else taken as a plain string.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `base[path[0]]...[path[-1]] = value`, creating mappings on the way."""
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def load_config(cls: type, file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), base: dict | None = None,
                values: dict[str, Any] | None = None) -> Any:
    """The resolved config: defaults <- `base` <- file <- overrides <- values.

    Args:
        cls: the top-level config dataclass.
        file: optional JSON/YAML file.
        overrides: `section.key=value` strings, applied in order.
        base: optional defaults a job sets before the file (e.g. the demo's tiny ViT).
        values: dotted keys -> already typed values (command-line flags), set as they are:
            no character in a path or name is parsed.
    """
    data = json.loads(json.dumps(base or {}))
    if file:
        for key, value in _flatten(read_config_file(file)):
            merge(data, key, value)
    for text in overrides:
        merge(data, *parse_override(text))
    for key, value in (values or {}).items():
        merge(data, key.split("."), value)
    return from_dict(cls, data)


def _flatten(data: dict[str, Any], prefix: tuple = ()):
    for key, value in data.items():
        # dict-typed fields (backbone_kwargs) are merged key by key too, which is what a user
        # overriding one kwarg expects.
        if isinstance(value, dict) and value:
            yield from _flatten(value, prefix + (key,))
        else:
            yield list(prefix + (key,)), value
