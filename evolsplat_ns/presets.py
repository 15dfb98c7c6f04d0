"""Preset files: named sets of ns-train hyper-parameters, validated against the method's config.

A preset is a YAML mapping with a ``method`` (a registered nerfstudio method such as ``evolsplat``
or ``evolsplat-lite``) and config overrides nested as the config dataclasses nest, using their
Python field names::

    method: evolsplat
    max_num_iterations: 30000
    pipeline:
      model: {sparseConv_outdim: 32, local_radius: 1}
      datamanager: {dataset: {segment_length: 20, downscale: 2}}
    optimizers: {networks: {optimizer: {lr: 1.0e-3}}}   # dict fields nest by their existing keys

``base: other.yaml`` starts from another preset (its overrides first, this file's on top).
A preset is applied in one of two equivalent ways:

- :func:`apply_overrides` returns a validated copy of a config object (tests, notebooks);
- :func:`preset_to_cli_args` turns the overrides into ns-train (tyro) flags, e.g.
  ``--pipeline.model.sparseConv-outdim 32``; ``evolsplat-train`` puts them right after the method
  name and before the user's own flags, so flags given on the command line win over the preset.

Only leaves are overridden; everything a preset does not mention keeps the method's default.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, Iterator, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

METHOD_KEY = "method"
"""The preset key naming the nerfstudio method; every other top-level key is an override."""
BASE_KEY = "base"
"""The preset key naming another preset file this one starts from."""

ConfigT = TypeVar("ConfigT")


class PresetError(ValueError):
    """A preset file or override that cannot be applied; the message names the file and key."""


# ----------------------------------------------------------------------------- loading


def load_preset(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read a preset file: ``(method name, nested overrides without the method/base keys)``.

    A preset may start from another with ``base: OTHER.yaml`` (relative to the preset's folder):
    the base's overrides are merged first, key by key, and this file's win; ``method`` may be
    left to the base.
    """
    return _load(Path(path), ())


def _load(path: Path, seen: tuple[Path, ...]) -> tuple[str, dict[str, Any]]:
    data = _read_mapping(path)
    base = data.pop(BASE_KEY, None)
    method = data.pop(METHOD_KEY, None)
    if base is not None:
        chain = (*seen, path.resolve())
        base_path = (path.parent / str(base)).resolve()
        if base_path in chain:
            raise PresetError(f"{path}: '{BASE_KEY}: {base}' makes a cycle of presets")
        base_method, base_overrides = _load(base_path, chain)
        method = method or base_method
        data = _merge(base_overrides, data)
    if not isinstance(method, str) or not method:
        raise PresetError(f"{path}: missing '{METHOD_KEY}: NAME' naming the ns-train method "
                          f"(e.g. '{METHOD_KEY}: evolsplat')")
    return method, data


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PresetError(f"preset file {path} does not exist (presets ship in configs/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PresetError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset is a YAML mapping with a '{METHOD_KEY}' key and config "
                          f"overrides, not a {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``top``, recursing where both hold a mapping."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else value
    return out


# ----------------------------------------------------------------------------- applying to a config


def apply_overrides(config: ConfigT, overrides: Mapping[str, Any], source: str = "overrides") -> ConfigT:
    """A deep copy of the dataclass ``config`` with every leaf of ``overrides`` set and type-checked.

    ``source`` (usually the preset's path) starts every error message. Raises :class:`PresetError`
    for an unknown key (listing the valid keys at that level) or a value of the wrong type.
    """
    result = copy.deepcopy(config)
    _apply(result, overrides, source, ())
    return result


def _apply(node: Any, overrides: Mapping[str, Any], source: str, path: tuple[str, ...]) -> None:
    if not isinstance(overrides, Mapping):
        raise PresetError(f"{source}: '{_dotted(path)}' is a group of settings; give a mapping of "
                          f"its keys {_settable_keys(node)}, not {overrides!r}")
    for key, value in overrides.items():
        key_path = (*path, str(key))
        current, hint = _child(node, key, source, key_path)
        if _is_group(current):
            _apply(current, value, source, key_path)  # a non-mapping value raises there
            continue
        new = _coerce(value, hint, f"{source}: '{_dotted(key_path)}'")
        if isinstance(node, dict):
            node[key] = new
        else:
            setattr(node, key, new)


def _is_group(value: Any) -> bool:
    """Config nodes a preset descends into rather than replaces: dataclasses and dicts."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or isinstance(value, dict)


def _settable_keys(node: Any) -> list[str]:
    """Keys a preset may set on ``node``: init fields not starting with ``_`` (tyro fixes those)."""
    if isinstance(node, dict):
        return sorted(map(str, node))
    return [f.name for f in dataclasses.fields(node) if f.init and not f.name.startswith("_")]


def _child(node: Any, key: Any, source: str, path: tuple[str, ...]) -> tuple[Any, Any]:
    """``(current value, type hint)`` of ``node[key]``; unknown keys raise with the valid ones."""
    valid = _settable_keys(node)
    if key not in valid:
        level = f"under '{_dotted(path[:-1])}'" if len(path) > 1 else "at the top level"
        raise PresetError(f"{source}: unknown key '{_dotted(path)}'; "
                          f"valid keys {level}: {', '.join(valid) or '(none)'}")
    if isinstance(node, dict):
        current = node[key]
        return current, Any if current is None else type(current)
    return getattr(node, key), _field_types(type(node))[key]


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (as YAML gives it) converted to ``hint``; raises :class:`PresetError` if it does not fit."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except PresetError:
                continue
        raise PresetError(f"{where} expects {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise PresetError(f"{where} must be one of {list(args)}, got {value!r}")
    if origin in (tuple, list) or hint in (tuple, list):
        return _coerce_sequence(value, hint, where)
    if _fits_scalar(value, hint):
        return Path(value) if isinstance(hint, type) and issubclass(hint, PurePath) else hint(value)
    raise PresetError(f"{where} expects {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _fits_scalar(value: Any, hint: Any) -> bool:
    # bool is an int subclass in Python, but 'true' for an int (or 1 for a bool) is a mistake.
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return isinstance(value, (str, PurePath))
    return False


def _coerce_sequence(value: Any, hint: Any, where: str) -> tuple | list:
    """A YAML list as ``tuple[X, ...]``, ``tuple[X, Y]`` or ``list[X]``, element by element."""
    if not isinstance(value, (list, tuple)):
        raise PresetError(f"{where} expects a list ({_describe(hint)}), got {value!r}")
    container = get_origin(hint) or hint
    args = get_args(hint)
    if container is list or (len(args) == 2 and args[1] is Ellipsis):
        elem_types = [args[0] if args else Any] * len(value)
    elif args:
        if len(value) != len(args):
            raise PresetError(f"{where} expects {len(args)} values ({_describe(hint)}), got {len(value)}: {value!r}")
        elem_types = list(args)
    else:
        elem_types = [Any] * len(value)
    return container(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, elem_types)))


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


# ----------------------------------------------------------------------------- ns-train flags


def preset_to_cli_args(overrides: Mapping[str, Any]) -> list[str]:
    """ns-train flags for ``overrides``, in preset order.

    Format (tyro as configured by ns-train, flag conversion off): ``--a.b.field-name VALUE``, each
    dotted part with inner ``_`` turned into ``-`` (case kept: ``--pipeline.model.sparseConv-outdim``);
    bools as ``True``/``False`` values, ``None`` as ``None``, lists as space-separated values
    (an empty list is the bare flag).
    """
    args: list[str] = []
    for path, value in _leaves(overrides, ()):
        args.append("--" + ".".join(_flag_part(p) for p in path))
        args.extend(_cli_values(value))
    return args


def _leaves(overrides: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*path, str(key)))
        else:
            yield (*path, str(key)), value


def _flag_part(name: str) -> str:
    """tyro's field-name rule: inner underscores become hyphens, leading/trailing ones stay."""
    core = name.strip("_")
    if not core:
        return name
    start = name.index(core)
    return name[:start] + core.replace("_", "-") + name[start + len(core):]


def _cli_values(value: Any) -> list[str]:
    # str() of a float is its shortest exact round-trip form; of None/bools it is what tyro parses.
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
