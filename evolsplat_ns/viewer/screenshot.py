"""Screenshots of nerfstudio's viewer on a trained checkpoint, taken by a real headless Chromium.

:class:`ViewerSession` starts the viewer in-process exactly as ``ns-viewer --load-config`` sets it
up (``eval_setup``, ``Viewer``, the local writer, ``init_scene``, ``update_scene``), with its render
lock in our hands and every model render the viewer asks for recorded (:class:`Render`). A page in
headless Chromium (SwiftShader gives it the software WebGL viser's three.js canvas needs) connects;
for each requested view the tool waits until the viewer has rendered that camera at full
resolution ("high" in nerfstudio's render state machine) and the page shows it (the viewport
screenshot differs from the placeholder and has stopped changing), then saves the viewport.

Views: ``default`` is what a newly connected browser sees (the viewer's starting pose,
``viewer/scene.py``: behind and above the shown segment's first keyframe view, frustums drawn);
``sourceK`` is the shown segment's K-th keyframe camera itself, set through viser's client camera
(position, orientation, vertical field of view), with the training-camera frustums hidden (the
camera's own frustum would cover the view). The viewer renders at the page canvas's aspect, so a
source view shows that camera's vertical field of view, wider or narrower than its image.

``evolsplat-screenshot`` (``cli/screenshot.py``) and ``tests/test_viewer_browser.py`` share this module.

Frames: viewer cameras are nerfstudio's, OpenGL camera-to-segment (x right, y up, z back), in
metres; viser positions are those times ``VISER_NERFSTUDIO_SCALE_RATIO``.
"""

from __future__ import annotations

import importlib.util
import io
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from evolsplat_ns.utils.errors import ConfigError, UserError
from evolsplat_ns.viewer.scene import look_from, start_view

if TYPE_CHECKING:
    import viser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
"""SwiftShader: a software WebGL for headless Chromium without a GPU."""
TIMEOUT_S = 60.0
INSTALL_HINT = ("install a Chromium (apt-get install chromium, or python -m playwright install chromium) "
                "and playwright (pip install playwright, or pip install -e '.[test]')")


class BrowserUnavailable(UserError):
    """No headless browser to take screenshots with; the message names what to install."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll ``condition`` every 50 ms; TimeoutError naming ``what`` after ``timeout`` seconds."""
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def settled_viewport(page, client: viser.ClientHandle, timeout: float = TIMEOUT_S) -> dict:
    """Page box of the 3D canvas once the layout has settled (the control panel slides in after
    connecting): the canvas whose aspect is the one the client camera reports, unchanged over a
    few polls. Renders are made for that aspect."""
    last, stable = None, 0

    def settled() -> bool:
        nonlocal last, stable
        boxes = [b for b in (c.bounding_box() for c in page.query_selector_all("canvas")) if b and b["height"] > 0]
        if not boxes:
            return False
        box = min(boxes, key=lambda b: abs(b["width"] / b["height"] - client.camera.aspect))
        matches = abs(box["width"] / box["height"] - client.camera.aspect) < 0.01
        stable = stable + 1 if matches and box == last else 0
        last = box
        return stable >= 5

    wait_for(settled, "the viewer layout to settle", timeout)
    return last


def screenshot(page, box: dict) -> np.ndarray:
    """Float RGB [H, W, 3] in [0, 1] of the page region ``box``."""
    from PIL import Image

    png = page.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0


def coarse(image: np.ndarray, cells: int = 12) -> np.ndarray:
    """Mean colour over a cells x cells grid, [cells, cells, 3], of an RGB image [H, W, 3]."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return torch.nn.functional.adaptive_avg_pool2d(t, cells)[0].permute(1, 2, 0).numpy()


def agreement(shown: np.ndarray, model_rgb: np.ndarray) -> dict[str, float]:
    """How much a viewport screenshot [H, W, 3] looks like the model's render [h, w, 3] (both in
    [0, 1], any sizes): ``correlation`` of the grey levels of 12 x 12 mean-colour grids, the largest
    channel difference of the mean colours, and the screenshot's pixel spread (0 = flat)."""
    a, b = coarse(shown), coarse(model_rgb)
    corr = float(np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1])
    return {"correlation": corr, "mean_colour_difference": float(np.abs(a.mean((0, 1)) - b.mean((0, 1))).max()),
            "std": float(shown.std())}


def as_sent(rgb: np.ndarray, aspect: float) -> np.ndarray:
    """The image nerfstudio's viewer sends the page for a render ``rgb`` [H, W, 3] when the client's
    camera has ``aspect`` (W / H): black bars pad it to that aspect once they would be over 5 px
    (``render_state_machine._send_output_to_viewer``). A render made for an older aspect (the first
    one, before the control panel has slid in) reaches the page letterboxed like this."""
    h, w = rgb.shape[:2]
    pad_w, pad_h = int(max(0, (aspect * h - w) // 2)), int(max(0, (w / aspect - h) // 2))
    if pad_w <= 5 and pad_h <= 5:
        return rgb
    return np.pad(rgb, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="constant", constant_values=0)


def browser_executable(chromium: Optional[Path] = None) -> Optional[str]:
    """The Chromium for playwright to launch: ``chromium`` if given, else ``/usr/bin/chromium``, else
    None for playwright's own downloaded Chromium. BrowserUnavailable (naming the install command)
    when playwright or every Chromium is missing."""
    if importlib.util.find_spec("playwright") is None:
        raise BrowserUnavailable(f"playwright is not installed; {INSTALL_HINT}")
    if chromium is not None:
        if not Path(chromium).is_file():
            raise BrowserUnavailable(f"--chromium {chromium} does not exist; {INSTALL_HINT}")
        return str(chromium)
    if CHROMIUM.is_file():
        return str(CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        if Path(p.chromium.executable_path).is_file():
            return None
    raise BrowserUnavailable(f"no Chromium: {CHROMIUM} is missing and playwright has not downloaded one; {INSTALL_HINT}")


@dataclass
class Render:
    """One model render made for the viewer: rgb [H, W, 3] in [0, 1], the camera's OpenGL
    camera-to-segment pose [3, 4], the render state machine's state ("low_move", "low_static",
    "high") and the time it finished."""

    rgb: np.ndarray
    c2w: np.ndarray
    state: str
    when: float


class ViewerSession:
    """nerfstudio's viewer on ``config_path``'s checkpoint, in-process and set up as ``ns-viewer``
    does (``nerfstudio/scripts/viewer/run_viewer.py``), listening on 127.0.0.1.

    Attributes:
        viewer: nerfstudio's ``Viewer``. pipeline: the loaded pipeline.
        lock: the viewer's render lock; held, no render can start or reach the page.
        renders: every model render the viewer asked for, in order (:class:`Render`).
    """

    def __init__(self, config_path: Path, port: Optional[int] = None) -> None:
        from nerfstudio.configs.base_config import ViewerConfig
        from nerfstudio.utils import writer
        from nerfstudio.utils.eval_utils import eval_setup
        from nerfstudio.viewer.viewer import Viewer

        config, pipeline, _, step = eval_setup(config_path, eval_num_rays_per_chunk=None, test_mode="test")
        self.pipeline = pipeline
        self.renders: list[Render] = []
        self.lock = threading.Lock()
        model_render = pipeline.model.get_outputs_for_camera

        def recording_render(camera, obb_box=None):
            machines = list(self.viewer.render_statemachines.values()) if hasattr(self, "viewer") else []
            state = machines[0].state if machines else "unknown"  # set before the render starts
            out = model_render(camera, obb_box=obb_box)
            self.renders.append(Render(out["rgb"].detach().float().clamp(0, 1).cpu().numpy(),
                                       camera.camera_to_worlds.reshape(3, 4).cpu().numpy(), state, time.time()))
            return out

        pipeline.model.get_outputs_for_camera = recording_render
        viewer_config = ViewerConfig(websocket_host="127.0.0.1", websocket_port=port or free_port())
        viewer_config.num_rays_per_chunk = config.viewer.num_rays_per_chunk
        config.vis, config.viewer = "viewer", viewer_config
        self.viewer = Viewer(config.viewer, log_filename=config.get_base_dir() / config.viewer.relative_log_filename,
                             datapath=pipeline.datamanager.get_datapath(), pipeline=pipeline,
                             share=False, train_lock=self.lock)
        # ns-viewer: no logging, but writer.GLOBAL_BUFFER (the viewer's render-speed estimate) needs it.
        config.logging.local_writer.enable = False
        writer.setup_local_writer(config.logging, max_iter=config.max_num_iterations,
                                  banner_messages=self.viewer.viewer_info)
        self.viewer.init_scene(train_dataset=pipeline.datamanager.train_dataset, train_state="completed",
                               eval_dataset=pipeline.datamanager.eval_dataset)
        self.viewer.update_scene(step=step)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.viewer.viser_server.get_port()}"

    def source_cameras(self):
        """The shown segment's keyframe cameras (nerfstudio ``Cameras``, OpenGL camera-to-segment)."""
        return self.pipeline.datamanager.train_dataset.cameras

    def close(self) -> None:
        """Stop the render threads and wait for them, then the server. A daemon render thread
        still inside torch when the interpreter exits is killed there, and the unwinding through
        torch's C++ aborts the process ("terminate called without an active exception", exit
        134, after every test passed). That includes the threads of clients that disconnected:
        nerfstudio drops their machines from ``render_statemachines`` without waiting for them."""
        machines = self.render_threads()
        for machine in machines:
            machine.running = False
        for machine in machines:
            machine.join(timeout=TIMEOUT_S)
        self.viewer.viser_server.stop()

    def render_threads(self) -> list[threading.Thread]:
        """The live render threads (nerfstudio ``RenderStateMachine``) of this viewer, those of
        disconnected clients included."""
        from nerfstudio.viewer.render_state_machine import RenderStateMachine

        return [t for t in threading.enumerate() if isinstance(t, RenderStateMachine) and t.viewer is self.viewer]

    def __enter__(self) -> "ViewerSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def high_render_of(self, client: viser.ClientHandle, since: float) -> Optional[Render]:
        """The last render if it is a full-resolution one of ``client``'s current camera, finished
        after ``since``; else None."""
        if not self.renders:
            return None
        last = self.renders[-1]
        c2w = self.viewer.get_camera_state(client).c2w.numpy()
        if last.when < since or last.state != "high" or np.abs(last.c2w - c2w).max() > 1e-3:
            return None
        return last


def look_through(client: viser.ClientHandle, cameras, index: int) -> None:
    """Set ``client``'s camera to camera ``index`` of nerfstudio ``cameras``: its pose (OpenGL
    camera-to-segment) and its vertical field of view."""
    c2w = cameras.camera_to_worlds[index].numpy(force=True)
    fov = 2.0 * float(np.arctan(float(cameras.height[index]) / (2.0 * float(cameras.fy[index]))))
    with client.atomic():
        client.camera.fov = fov
    look_from(client, c2w, back_m=0.0, up_m=0.0)


def parse_views(spec: str, num_sources: int) -> list[tuple[str, Optional[int]]]:
    """``"default,source0,..."`` -> [(name, source index or None)]; ConfigError for unknown names."""
    views = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name == "default":
            views.append((name, None))
        elif name.startswith("source") and name[6:].isdigit() and int(name[6:]) < num_sources:
            views.append((name, int(name[6:])))
        else:
            raise ConfigError(f"--views: unknown view {name!r}; use default or source0..source{num_sources - 1} "
                              f"(the shown segment's {num_sources} keyframe cameras)")
    if not views:
        raise ConfigError("--views is empty; e.g. --views default,source0")
    return views


@dataclass
class ViewShot:
    """A captured view: the viewport screenshot [H, W, 3], the model render it shows, the page
    (PNG bytes), and :func:`agreement` between the two."""

    name: str
    viewport: np.ndarray
    render: Render
    page_png: bytes
    agreement: dict = field(default_factory=dict)
    source_index: Optional[int] = None


def _shown_on_page(page, box: dict, placeholder: np.ndarray, timeout: float) -> np.ndarray:
    """The viewport once it differs from the placeholder and has not changed over 3 polls (~1 s)."""
    frames: list[np.ndarray] = []

    def steady() -> bool:
        frames.append(screenshot(page, box))
        del frames[:-3]
        if len(frames) < 3 or np.abs(frames[-1] - placeholder).mean() < 0.02:
            return False
        return all(np.abs(f - frames[-1]).mean() < 1e-3 for f in frames[:-1])

    def polled() -> bool:
        time.sleep(0.35)
        return steady()

    wait_for(polled, "the render to be painted on the page", timeout)
    return frames[-1]


def capture_views(session: ViewerSession, views: list[tuple[str, Optional[int]]], width: int = 1000,
                  height: int = 700, executable: Optional[str] = None, timeout: float = TIMEOUT_S,
                  on_placeholder: Optional[Callable[[np.ndarray, bytes], None]] = None) -> list[ViewShot]:
    """Open ``session``'s viewer in headless Chromium (page ``width`` x ``height`` CSS pixels) and
    capture ``views`` (:func:`parse_views`). ``on_placeholder(viewport, page_png)`` sees the page
    before any render has reached it."""
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            server = session.viewer.viser_server
            with session.lock:  # no render reaches the page while the placeholder is captured
                since = time.time()
                page.goto(session.url)
                wait_for(lambda: len(server.get_clients()) == 1, "the page to connect to the viewer", timeout)
                client = next(iter(server.get_clients().values()))
                box = settled_viewport(page, client, timeout)
                placeholder = screenshot(page, box)
                if on_placeholder is not None:
                    on_placeholder(placeholder, page.screenshot())
            for i, (name, index) in enumerate(views):
                if index is not None:
                    session.viewer.set_camera_visibility(False)  # its own frustum would cover the view
                    since = time.time()
                    look_through(client, session.source_cameras(), index)
                else:
                    session.viewer.set_camera_visibility(True)
                    if i > 0:  # back to the starting pose the viewer gave the new client
                        since = time.time()
                        start_view(client, session.source_cameras())
                wait_for(lambda: session.high_render_of(client, since) is not None,
                         f"the viewer's full-resolution render of view {name}", timeout)
                with session.lock:  # freeze renders: the page keeps showing the one recorded
                    shown = _shown_on_page(page, box, placeholder, timeout)
                    render = session.renders[-1]
                    sent = as_sent(render.rgb, box["width"] / box["height"])
                    shots.append(ViewShot(name, shown, render, page.screenshot(), agreement(shown, sent), index))
        finally:
            browser.close()
    return shots


def side_by_side(panels: list[tuple[str, np.ndarray]], height: int = 360):
    """PIL image of labelled RGB panels [H, W, 3] in [0, 1], each scaled to ``height`` pixels."""
    from PIL import Image, ImageDraw

    images = []
    for label, rgb in panels:
        im = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
        im = im.resize((max(1, round(im.width * height / im.height)), height), Image.BILINEAR)
        ImageDraw.Draw(im).text((6, 4), label, fill=(255, 255, 0))
        images.append(im)
    out = Image.new("RGB", (sum(i.width for i in images) + 4 * (len(images) - 1), height), (0, 0, 0))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + 4
    return out
