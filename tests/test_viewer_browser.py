"""nerfstudio's viewer on a trained evolsplat checkpoint, seen by a real (headless) Chromium.

The viewer runs in-process as ``ns-viewer --load-config`` sets it up
(``evolsplat_ns.viewer.screenshot.ViewerSession``, which also records every model render), so the
test can hold the viewer's render lock: the page connects and is screenshotted while no render can
reach it, then the lock is released, the first model render is awaited server-side (the viewer's
"Resolution" stat changes when a frame is sent) and the page is screenshotted again. The 3D
viewport of the second screenshot must show that render: textured (pixel spread), different from
the first screenshot, and laid out like the image the model produced (correlation of coarse grids,
close mean colour). Screenshots are kept under ``artifacts/viewer_browser/``. The helpers are the
ones ``evolsplat-screenshot`` uses (``tests/test_screenshot.py`` tests the tool).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from evolsplat_ns.viewer.screenshot import (CHROMIUM, CHROMIUM_ARGS, ViewerSession, agreement, as_sent, screenshot,
                                            settled_viewport, wait_for)
from tiny_run import tiny_checkpoint

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "viewer_browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install -e '.[test]')"),
]


MIN_CORRELATION, MAX_COLOUR_DIFFERENCE = 0.7, 0.1
"""How closely the viewport must agree with the model's render (coarse-grid correlation, mean colour)."""


def assert_shows_render(after: np.ndarray, before: np.ndarray, model_rgb: np.ndarray) -> None:
    """The viewport ``after`` shows the model render ``model_rgb``, not the placeholder ``before``."""
    a = agreement(after, model_rgb)
    assert a["std"] > 0.05, "the viewport is flat: no rendered image"
    assert np.abs(after - before).mean() > 0.05, "the viewport did not change when the render arrived"
    assert a["correlation"] > MIN_CORRELATION, f"the viewport does not look like the model's render (correlation {a['correlation']:.2f})"
    assert a["mean_colour_difference"] < MAX_COLOUR_DIFFERENCE, "mean colour differs from the render"


def painted_render(page, box, renders: list[np.ndarray], tries: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(viewport screenshot, the recorded render it looks most like), once the page shows a render.

    The page shows one of the frames rendered so far: a frame rendered between the stats update and
    the render lock (another size, or the client's camera arriving) may be newer than the painted
    one. The first render is made for the page's aspect before the control panel slides in; when
    the lock is taken before a render at the settled aspect follows (twice so far, once in CI:
    correlation 0.52-0.53 with every bare render), the page shows it letterboxed, so each
    render is also compared as sent at the viewport's aspect (:func:`as_sent`). Transfer and paint
    take ~1 s, so the viewport is read every 0.5 s, up to ``tries`` times, until it agrees with a
    render; the last reading is returned either way.
    """
    renders = renders + [as_sent(rgb, box["width"] / box["height"]) for rgb in renders]
    for _ in range(tries):
        page.wait_for_timeout(500)
        after = screenshot(page, box)
        model_rgb = max(renders, key=lambda rgb: agreement(after, rgb)["correlation"])
        a = agreement(after, model_rgb)
        if a["correlation"] > MIN_CORRELATION and a["mean_colour_difference"] < MAX_COLOUR_DIFFERENCE:
            break
    return after, model_rgb


@pytest.fixture(scope="module")
def session(tiny_dataset, tmp_path_factory):
    with ViewerSession(tiny_checkpoint(tiny_dataset, tmp_path_factory)) as s:
        # The dome, not the sources warped at infinity (the default): this test checks that the
        # page shows the model's render, by a coarse-grid correlation of the viewport (which also
        # shows the training frustums' thumbnails) with the first, ~70 px render; the warp's sharp
        # bright sky column drops that correlation to ~0.6 (fifth session) while the dome's smooth
        # background keeps it above 0.7. Which layout detail costs the correlation is not yet known.
        s.pipeline.model.predictor.config.background_source = "dome"
        yield s


def test_viewer_page_shows_the_model_render(session):
    from playwright.sync_api import sync_playwright

    v, lock, rendered = session.viewer, session.lock, session.renders
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            with lock:  # no render can reach the page while the "before" screenshot is taken
                page.goto(session.url)
                wait_for(lambda: len(v.viser_server.get_clients()) == 1, "the page to connect")
                client = next(iter(v.viser_server.get_clients().values()))
                box = settled_viewport(page, client)
                before = screenshot(page, box)
                page.screenshot(path=str(ARTIFACTS / "before.png"))
                assert not rendered
            wait_for(lambda: "0x0px" not in v.stats_markdown.content, "the first rendered frame")
            with lock:  # freeze renders so the page keeps showing the last one recorded
                after, model_rgb = painted_render(page, box, [r.rgb for r in rendered])
                page.screenshot(path=str(ARTIFACTS / "after.png"))
        finally:
            browser.close()
    print(f"viewer screenshots in {ARTIFACTS} (render reached the page {time.time() - t0:.1f} s after start)")
    assert_shows_render(after, before, model_rgb)


def test_closing_a_session_waits_for_its_render_threads(tiny_dataset, tmp_path_factory):
    """After ``close`` no render thread of the viewer is alive, a disconnected client's included
    (nerfstudio stops and drops its machine without waiting): one still rendering when the
    interpreter exits aborts the process after the tests passed (exit 134)."""
    from playwright.sync_api import sync_playwright

    session = ViewerSession(tiny_checkpoint(tiny_dataset, tmp_path_factory))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                browser.new_page().goto(session.url)
                wait_for(lambda: len(session.renders) > 0, "the first render")
            finally:
                browser.close()
    finally:
        session.close()
    alive = session.render_threads()
    assert not alive, f"{len(alive)} render thread(s) still running after close()"
