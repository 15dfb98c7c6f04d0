"""evolsplat-screenshot on the tiny checkpoint: the viewer's default view and a source camera, as
headless Chromium shows them, written as PNGs that show the model's render (the checks of
tests/test_viewer_browser.py), with the source view's render made at that camera's pose."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from evolsplat_ns.viewer.screenshot import CHROMIUM
from test_viewer_browser import assert_shows_render
from tiny_run import tiny_checkpoint

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install -e '.[test]')"),
]


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def test_screenshot_tool_writes_the_rendered_views(tiny_dataset, tmp_path_factory, tmp_path):
    from evolsplat_ns.cli.screenshot import main

    config = tiny_checkpoint(tiny_dataset, tmp_path_factory)
    out = tmp_path / "shots"
    report = main(["--load-config", str(config), "--out", str(out), "--views", "default,source1",
                   "--width", "800", "--height", "560"])
    assert json.loads((out / "screenshots.json").read_text()) == report
    placeholder = _png(out / "placeholder.png")
    for view in ("default", "source1"):
        for suffix in ("", "_page", "_render", "_side_by_side"):
            assert (out / f"{view}{suffix}.png").stat().st_size > 0, (view, suffix)
        assert_shows_render(_png(out / f"{view}.png"), placeholder, _png(out / f"{view}_render.png"))
    default, source = (np.array(report["views"][v]["c2w_opengl"]) for v in ("default", "source1"))
    assert np.abs(default - source).max() > 0.1, "the source view was rendered from the default pose"
    camera = np.array(report["views"]["source1"]["camera_c2w_opengl"])  # the dataset's keyframe camera 1
    assert np.abs(source - camera).max() < 1e-3, "the viewer did not render through source camera 1"


def test_screenshot_tool_refusals(tmp_path, monkeypatch):
    import evolsplat_ns.viewer.screenshot as shot
    from evolsplat_ns.cli.screenshot import main
    from evolsplat_ns.utils.errors import ConfigError
    from evolsplat_ns.viewer.screenshot import BrowserUnavailable, parse_views

    with pytest.raises(BrowserUnavailable, match="apt-get install chromium"):
        shot.browser_executable(tmp_path / "no-chromium")
    with monkeypatch.context() as m:
        m.setattr(shot.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(BrowserUnavailable, match="pip install playwright"):
            shot.browser_executable()

    with pytest.raises(FileNotFoundError, match="config.yml"):
        main(["--load-config", str(tmp_path / "nope.yml"), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="source0..source2"):
        parse_views("default,source3", 3)
    assert parse_views("default, source2", 3) == [("default", None), ("source2", 2)]
