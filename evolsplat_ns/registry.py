"""Plugin registry: third parties add components through Python entry points.

Each kind of component has an entry-point group. A plugin package declares, in its pyproject::

    [project.entry-points."evolsplat_ns.pointcloud_generators"]
    my_gen = "my_pkg.gen:MyGeneratorConfig"

The object an entry point names is a config class/instance (a dataclass with ``_target``) or a
factory; :func:`get` returns it. The built-ins register themselves through the same groups in
evolsplat-ns's own pyproject, so they are found the same way. Names registered at runtime with
:func:`register` (tests, notebooks) take precedence over entry points.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

GROUPS = {
    "pointcloud_generators": "evolsplat_ns.pointcloud_generators",
    "dynamic_segmenters": "evolsplat_ns.dynamic_segmenters",
    "flow_estimators": "evolsplat_ns.flow_estimators",
    "refine_heads": "evolsplat_ns.refine_heads",
    "losses": "evolsplat_ns.losses",
    "data_sources": "evolsplat_ns.data_sources",
}
_RUNTIME: dict[str, dict[str, Any]] = {kind: {} for kind in GROUPS}


class UnknownComponentError(KeyError):
    """A component name that no entry point or runtime registration provides."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def _check_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise UnknownComponentError(f"unknown component kind {kind!r}; kinds: {sorted(GROUPS)}")
    return GROUPS[kind]


def available(kind: str) -> list[str]:
    """Sorted names of every component of ``kind`` (entry points and runtime registrations)."""
    group = _check_kind(kind)
    return sorted({ep.name for ep in entry_points(group=group)} | set(_RUNTIME[kind]))


def get(kind: str, name: str) -> Any:
    """Load the object registered as ``name`` for ``kind``; errors list what is available."""
    group = _check_kind(kind)
    if name in _RUNTIME[kind]:
        return _RUNTIME[kind][name]
    for ep in entry_points(group=group):
        if ep.name == name:
            return _load(ep)
    raise UnknownComponentError(
        f"no {kind[:-1].replace('_', ' ')} named {name!r}; available: {available(kind)}. "
        f"Third-party components register under the entry-point group {group!r}."
    )


def _load(ep) -> Any:
    """Load an entry point; a broken one (missing module or attribute) names itself and its package."""
    try:
        return ep.load()
    except (ImportError, AttributeError) as e:
        dist = getattr(ep, "dist", None)
        owner = f" (declared by package {dist.name!r})" if dist is not None else ""
        raise UnknownComponentError(
            f"entry point {ep.name!r} = {ep.value!r} in group {ep.group!r}{owner} cannot be loaded: {e}. "
            f"Fix or reinstall that package."
        ) from e


def register(kind: str, name: str, obj: Any) -> None:
    """Register ``obj`` under ``name`` for this process (overrides an entry point of that name)."""
    _check_kind(kind)
    _RUNTIME[kind][name] = obj


def unregister(kind: str, name: str) -> None:
    _check_kind(kind)
    _RUNTIME[kind].pop(name, None)
