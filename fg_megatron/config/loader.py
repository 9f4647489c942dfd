"""Typed configs: dataclasses <- YAML <- CLI overrides, one set of dotted names.

``load_config(RunConfig, "configs/x.yaml", ["optim.lr=1e-5", "train.steps=10"])``
builds nested dataclasses; unknown keys and badly typed values are errors that
name the file (or ``--set``) and the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        # No config field means anything with NaN or inf; YAML's .nan / "inf" would pass
        # every range check below (NaN compares false) and surface steps later.
        if not math.isfinite(number):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where or 'top level'}: unknown key {key!r} (known: {known})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_config(cls: type[T], path: Optional[Union[str, Path]] = None,
                overrides: Iterable[Union[str, tuple[str, Any]]] = (),
                base: Optional[Mapping[str, Any]] = None) -> T:
    """Build ``cls`` from defaults, then ``base``, then the YAML file, then overrides.

    Cross-field checks (``__post_init__``) see the final values, so overrides can
    be given in any order; an error names the file or the override it comes from.
    """
    tree: dict = to_dict(cls()) if base is None else _merge(to_dict(cls()), base)
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{line} invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping")
        # A run's config.yaml records its resumes' changes; the record is not a setting.
        loaded = {k: v for k, v in loaded.items() if k != HISTORY_KEY}
        tree = _clear_exclusive(_merge(tree, loaded), set(_dotted_keys(loaded)))
        try:
            _build(cls, tree, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    applied, given = [], set()
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        probe: dict = {}
        _set_dotted(probe, key, value)
        tree = _merge(tree, probe)
        applied.append(f"{key}={value!r}")
        given.update(_dotted_keys(probe))
    tree = _clear_exclusive(tree, given)
    try:
        return _build(cls, tree, "")
    except ConfigError as exc:
        where = f"{source} with overrides {', '.join(applied)}" if applied else source
        raise ConfigError(f"{where}: {exc}") from None


HISTORY_KEY = "resume_history"

# Pairs of fields that say one thing two ways: a layer (the config file, or the overrides) that
# sets one of them drops the other's value from the layers below; setting both in one layer is
# left to the schema's check.
EXCLUSIVE = (("train.steps", "train.epochs"),)


def _dotted_keys(tree: Mapping, prefix: str = "") -> Iterable[str]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _clear_exclusive(tree: dict, given: set) -> dict:
    for pair in EXCLUSIVE:
        for mine, other in (pair, pair[::-1]):
            if mine in given and other not in given:
                probe: dict = {}
                _set_dotted(probe, other, None)
                tree = _merge(tree, probe)
    return tree


def save_config(obj: Any, path: Union[str, Path], history: Optional[list[dict]] = None) -> None:
    """Write ``obj`` as YAML (atomically); ``history``: the (step, field, old, new) changes of
    earlier resumes, kept under ``resume_history`` (ignored by :func:`load_config`)."""
    tree = to_dict(obj)
    if history:
        tree[HISTORY_KEY] = history
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(path)
