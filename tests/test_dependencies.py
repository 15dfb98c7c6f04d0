"""Dependency hygiene: one spconv build per install path, pins that match what we test."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_each_install_path_has_exactly_one_spconv_build():
    project = _pyproject()
    spconv = re.compile(r"^spconv(-cu\d+)?\b")
    assert not [d for d in project["dependencies"] if spconv.match(d)], "spconv must not be a base dependency"
    for extra in ("cpu", "cu121", "cu124", "cu126"):
        builds = [d for d in project["optional-dependencies"][extra] if spconv.match(d)]
        assert len(builds) == 1, (extra, builds)


def test_nerfstudio_and_gsplat_are_pinned_to_the_tested_ranges():
    deps = {re.split(r"[<>=!~ ]", d)[0]: d for d in _pyproject()["dependencies"]}
    assert deps["nerfstudio"] == "nerfstudio>=1.1.5,<1.2"
    assert deps["gsplat"] == "gsplat>=1.4.0,<1.5"


def test_untested_gsplat_gets_a_clear_error(monkeypatch):
    import gsplat

    monkeypatch.setattr(gsplat, "__version__", "1.5.3")
    monkeypatch.delitem(sys.modules, "evolsplat_ns.model.render.reference", raising=False)
    with pytest.raises(ImportError, match=r"gsplat 1\.5\.3 is installed .*pip install 'gsplat>=1\.4\.0,<1\.5'"):
        importlib.import_module("evolsplat_ns.model.render.reference")
    monkeypatch.undo()  # the original module is back in sys.modules
    assert importlib.import_module("evolsplat_ns.model.render.reference").GSPLAT_TESTED
