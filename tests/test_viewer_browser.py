"""nerfstudio's viewer on a trained evolsplat checkpoint, seen by a real (headless) Chromium.

The viewer runs in-process (as ``ns-viewer --load-config`` sets it up: ``eval_setup`` then
``Viewer`` + ``init_scene``), so the test can hold the viewer's render lock: the page connects and
is screenshotted while no render can reach it, then the lock is released, the first model render
is awaited server-side (the viewer's "Resolution" stat changes when a frame is sent) and the page
is screenshotted again. The 3D viewport of the second screenshot must show that render: textured
(pixel spread), different from the first screenshot, and laid out like the image the model
produced (correlation of coarse grids, close mean colour). Screenshots are kept under
``artifacts/viewer_browser/``.
"""

from __future__ import annotations

import importlib.util
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_run import tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "viewer_browser"
# SwiftShader gives headless Chromium a software WebGL, which viser's three.js canvas needs.
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
TIMEOUT_S = 60.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install -e '.[test]')"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = TIMEOUT_S) -> None:
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def viewer(tiny_dataset, tmp_path_factory):
    """(Viewer, its render lock, the list of rgb images [H, W, 3] the model rendered for it)."""
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.utils.eval_utils import eval_setup
    from nerfstudio.viewer.viewer import Viewer

    config_path = tiny_checkpoint(tiny_dataset, tmp_path_factory)
    _, pipeline, _, step = eval_setup(config_path, test_mode="inference")
    rendered: list[torch.Tensor] = []
    model_render = pipeline.model.get_outputs_for_camera

    def recording_render(camera, obb_box=None):
        out = model_render(camera, obb_box=obb_box)
        rendered.append(out["rgb"].detach().cpu())
        return out

    pipeline.model.get_outputs_for_camera = recording_render
    lock = threading.Lock()
    v = Viewer(ViewerConfig(websocket_host="127.0.0.1", websocket_port=free_port()),
               log_filename=config_path.parent / "viewer_log_filename.txt", datapath=tiny_dataset,
               pipeline=pipeline, train_lock=lock)
    v.init_scene(train_dataset=pipeline.datamanager.train_dataset, train_state="completed")
    v.update_scene(step=step)
    yield v, lock, rendered
    for machine in v.render_statemachines.values():
        machine.running = False
    v.viser_server.stop()


def settled_viewport(page, client) -> dict:
    """Page box of the 3D canvas once the layout has settled (the control panel slides in after
    connecting): the canvas whose aspect is the one the client camera reports, unchanged over a
    few polls. Renders are made for that aspect."""
    last, stable = None, 0

    def settled() -> bool:
        nonlocal last, stable
        boxes = [b for b in (c.bounding_box() for c in page.query_selector_all("canvas")) if b and b["height"] > 0]
        box = min(boxes, key=lambda b: abs(b["width"] / b["height"] - client.camera.aspect))
        matches = abs(box["width"] / box["height"] - client.camera.aspect) < 0.01
        stable = stable + 1 if matches and box == last else 0
        last = box
        return stable >= 5

    wait_for(settled, "the viewer layout to settle")
    return last


def screenshot(page, box: dict) -> np.ndarray:
    """Float RGB [H, W, 3] in [0, 1] of the page region ``box``."""
    from PIL import Image

    png = page.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0


def coarse(image: np.ndarray, cells: int = 12) -> np.ndarray:
    """Mean colour over a cells x cells grid, [cells, cells, 3]."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    return torch.nn.functional.adaptive_avg_pool2d(t, cells)[0].permute(1, 2, 0).numpy()


def test_viewer_page_shows_the_model_render(viewer):
    from playwright.sync_api import sync_playwright

    v, lock, rendered = viewer
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            with lock:  # no render can reach the page while the "before" screenshot is taken
                page.goto(f"http://127.0.0.1:{v.viser_server.get_port()}")
                wait_for(lambda: len(v.viser_server.get_clients()) == 1, "the page to connect")
                client = next(iter(v.viser_server.get_clients().values()))
                box = settled_viewport(page, client)
                before = screenshot(page, box)
                page.screenshot(path=str(ARTIFACTS / "before.png"))
                assert not rendered
            wait_for(lambda: "0x0px" not in v.stats_markdown.content, "the first rendered frame")
            with lock:  # freeze renders so the page keeps showing the last one recorded
                page.wait_for_timeout(1500)  # transfer + paint of the frame
                after = screenshot(page, box)
                page.screenshot(path=str(ARTIFACTS / "after.png"))
                model_rgb = rendered[-1].numpy()
        finally:
            browser.close()
    print(f"viewer screenshots in {ARTIFACTS} (render reached the page {time.time() - t0:.1f} s after start)")

    assert after.std() > 0.05, "the viewport is flat: no rendered image"
    assert np.abs(after - before).mean() > 0.05, "the viewport did not change when the render arrived"
    shown, model = coarse(after), coarse(model_rgb)
    corr = np.corrcoef(shown.mean(-1).ravel(), model.mean(-1).ravel())[0, 1]
    assert corr > 0.7, f"the viewport does not look like the model's render (correlation {corr:.2f})"
    assert np.abs(shown.mean((0, 1)) - model.mean((0, 1))).max() < 0.1, "mean colour differs from the render"
