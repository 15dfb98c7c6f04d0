"""Load a run's ``config.yml`` without running code from it.

ns-train writes the run's ``TrainerConfig`` with ``yaml.dump``: Python tags for nerfstudio and
evolsplat config dataclasses (``!!python/object:``), their ``_target`` classes
(``!!python/name:``), paths and enums (``!!python/object/apply:pathlib.PosixPath``) and tuples.
``yaml.Loader`` would also run any callable a crafted file names (``!!python/object/apply:os.system``).
:class:`RunConfigLoader` accepts only classes of the allowed packages, instantiates through a call
only paths and enums, and refuses every other Python tag with :class:`UnsafeConfigError`.
"""

from __future__ import annotations

import enum
from pathlib import Path, PurePath
from typing import Any

import yaml
from yaml.constructor import FullConstructor

from evolsplat_ns.utils.errors import UserError

ALLOWED_PACKAGES = ("nerfstudio", "evolsplat_ns", "pathlib", "torch.optim")
"""Packages whose classes a run config may name (optimizers are torch.optim classes)."""


class UnsafeConfigError(UserError):
    """A config file asks for a Python object outside the allowed config types."""


def _allowed_module(name: str) -> bool:
    module = name.rpartition(".")[0]
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


class RunConfigLoader(yaml.UnsafeLoader):
    """``yaml.Loader`` restricted to config types (see the module docstring)."""

    def _refuse(self, what: str, mark) -> None:
        raise UnsafeConfigError(f"{self.name}: {what} at line {mark.line + 1} is not a nerfstudio/evolsplat "
                                "config type; refusing to load it (a run's config.yml written by ns-train "
                                "never holds one: was the file edited or replaced?)")

    def find_python_name(self, name: str, mark, unsafe: bool = False) -> type:
        if not _allowed_module(name):
            self._refuse(f"Python name {name!r}", mark)
        obj = FullConstructor.find_python_name(self, name, mark, unsafe=True)
        if not isinstance(obj, type):
            self._refuse(f"{name!r} (a {type(obj).__name__}, not a class)", mark)
        return obj

    def find_python_module(self, name: str, mark, unsafe: bool = False):
        self._refuse(f"Python module {name!r}", mark)

    def construct_checked_apply(self, suffix: str, node, newobj: bool = False) -> Any:
        """``!!python/object/apply:`` and ``/new:`` call the class: only paths and enums."""
        cls = self.find_python_name(suffix, node.start_mark)
        if not issubclass(cls, (PurePath, enum.Enum)):
            self._refuse(f"a call of {suffix!r}", node.start_mark)
        return FullConstructor.construct_python_object_apply(self, suffix, node, newobj)

    def construct_checked_new(self, suffix: str, node) -> Any:
        return self.construct_checked_apply(suffix, node, newobj=True)


RunConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:",
                                      RunConfigLoader.construct_checked_apply)
RunConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/object/new:",
                                      RunConfigLoader.construct_checked_new)


def load_run_config(path: Path) -> Any:
    """The object stored in the run config ``path``; UnsafeConfigError for disallowed Python tags,
    UserError naming the file when it is not YAML."""
    path = Path(path)
    try:
        loader = RunConfigLoader(path.read_text())
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not a readable run config ({e})") from None
