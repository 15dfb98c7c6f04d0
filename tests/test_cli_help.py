"""Every flag we define has help text; nerfstudio's NeRF leftovers and duplicate knobs are hidden."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import tyro
from tyro._docstrings import get_field_docstring


def _our_dataclasses(config) -> list:
    """Every dataclass instance in ``config``'s tree (dict values included)."""
    seen, out, todo = set(), [], [config]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            out.append(obj)
            todo.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    return out


def _declaring_class(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose body declares field ``name`` (last redeclaration wins)."""
    return next(k for k in cls.__mro__ if name in getattr(k, "__annotations__", {}))


def _suppressed(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    return any(m is tyro.conf.Suppress or m is tyro.conf.SuppressFixed
               for m in getattr(hint, "__metadata__", ()))


@pytest.fixture(scope="module", params=["evolsplat", "evolsplat-lite"])
def method_config(request):
    from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config

    return {"evolsplat": evolsplat_config, "evolsplat-lite": evolsplat_lite_config}[request.param]()


def test_every_field_we_declare_has_a_docstring(method_config):
    missing = []
    for obj in _our_dataclasses(method_config):
        cls = type(obj)
        for f in dataclasses.fields(obj):
            owner = _declaring_class(cls, f.name)
            if not owner.__module__.startswith("evolsplat_ns") or f.name.startswith("_"):
                continue
            if _suppressed(cls, f.name):
                continue
            if not (get_field_docstring(owner, f.name, ()) or "").strip():
                missing.append(f"{owner.__name__}.{f.name}")
    assert not missing, f"fields without a docstring (no --help text): {sorted(set(missing))}"


def help_text(config) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(tyro.conf.FlagConversionOff[type(config)], default=config, args=["--help"])
    return out.getvalue()


@pytest.mark.parametrize("flag", [
    "--pipeline.model.collider-params", "--pipeline.model.eval-num-rays-per-chunk",
    "--pipeline.model.loss-coefficients", "--pipeline.model.enable-collider", "--pipeline.model.prompt",
    "--mixed-precision ", "--optimizers.networks.optimizer.max-norm", "--pipeline.datamanager.dataset.data ",
    "--pipeline.datamanager.dataparser", "--pipeline.datamanager.train-num-rays-per-batch",
])
def test_leftovers_and_duplicates_are_hidden(method_config, flag):
    assert flag not in help_text(method_config)


def test_the_one_name_of_each_knob_is_shown(method_config):
    text = help_text(method_config)
    for flag in ("--use-mixed-precision", "--gradient-clip-val", "--pipeline.datamanager.data",
                 "--pipeline.model.sh-degree", "--pipeline.datamanager.dataset.num-source-keyframes"):
        assert flag in text
