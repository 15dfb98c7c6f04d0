"""``evolsplat-screenshot``: PNG screenshots of nerfstudio's viewer on a trained run, from headless Chromium.

Example::

    evolsplat-screenshot --load-config outputs/demo/runs/.../config.yml --out shots/ \\
        [--views default,source0] [--width 1000 --height 700]

Starts the viewer in-process as ``ns-viewer --load-config`` does, opens it in headless Chromium
and, for every view, waits until the viewer's full-resolution model render has reached the page
(``evolsplat_ns/viewer/screenshot.py``). Views: ``default`` (what a new browser first sees) and
``sourceK`` (the shown segment's K-th keyframe camera). Writes into a new or empty ``--out``:
``placeholder.png`` (the page before any render), per view ``{view}.png`` (the 3D viewport),
``{view}_page.png`` (the whole page, panel included), ``{view}_render.png`` (the model's render
the viewer displayed), ``{view}_side_by_side.png`` (viewport | model render | for source views the
camera's image), and ``screenshots.json`` (per view: camera pose, render size, and how much the
viewport looks like the render: correlation, mean-colour difference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolsplat-screenshot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True, help="the run's config.yml")
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder for the PNGs")
    parser.add_argument("--views", default="default", help="comma-separated: default, source0, source1, ...")
    parser.add_argument("--width", type=int, default=1000, help="browser page width (CSS pixels)")
    parser.add_argument("--height", type=int, default=700, help="browser page height (CSS pixels)")
    parser.add_argument("--chromium", type=Path, default=None,
                        help="Chromium executable (default: /usr/bin/chromium, else playwright's own)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    return parser


def _save(rgb, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> dict:
    """Take the screenshots; returns the ``screenshots.json`` report (tests call this directly)."""
    from evolsplat_ns.viewer.screenshot import ViewerSession, browser_executable, capture_views, parse_views, side_by_side

    args = build_parser().parse_args(argv)
    if not args.load_config.is_file():
        raise FileNotFoundError(f"--load-config {args.load_config} not found: pass a run's config.yml "
                                "(outputs/.../<method>/<timestamp>/config.yml, as ns-viewer takes)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"--out {args.out} exists and is not empty; choose a new folder")
    executable = browser_executable(args.chromium)  # before loading the model: fail fast
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": str(args.load_config), "page": [args.width, args.height], "views": {}}
    with ViewerSession(args.load_config) as session:
        cameras = session.source_cameras()
        views = parse_views(args.views, len(cameras))

        def keep_placeholder(viewport, page_png: bytes) -> None:
            _save(viewport, args.out / "placeholder.png")

        shots = capture_views(session, views, args.width, args.height, executable, args.timeout, keep_placeholder)
        images = session.pipeline.datamanager.train_dataset.sample.source.images
        for shot in shots:
            _save(shot.viewport, args.out / f"{shot.name}.png")
            (args.out / f"{shot.name}_page.png").write_bytes(shot.page_png)
            _save(shot.render.rgb, args.out / f"{shot.name}_render.png")
            h, w = shot.render.rgb.shape[:2]
            panels = [("viewer (browser)", shot.viewport), (f"model render {w}x{h}", shot.render.rgb)]
            if shot.source_index is not None:
                panels.append((f"image of source {shot.source_index}", images[shot.source_index].numpy()))
            side_by_side(panels).save(args.out / f"{shot.name}_side_by_side.png")
            entry = {"render_size": [w, h], "c2w_opengl": shot.render.c2w.round(6).tolist(),
                     "source_index": shot.source_index, **shot.agreement}
            if shot.source_index is not None:
                entry["camera_c2w_opengl"] = cameras.camera_to_worlds[shot.source_index].numpy(force=True).round(6).tolist()
            report["views"][shot.name] = entry
            print(f"{shot.name}: {args.out / (shot.name + '.png')} (render {w}x{h}, viewport vs render "
                  f"correlation {shot.agreement['correlation']:.2f})")
    (args.out / "screenshots.json").write_text(json.dumps(report, indent=1))
    return report


def entrypoint() -> None:
    """Console script; refusals (missing browser or config, used --out, bad views) exit with status 2."""
    from evolsplat_ns._compat.process import prepare_process
    from evolsplat_ns.utils.errors import exit_on_user_error

    prepare_process()
    exit_on_user_error("evolsplat-screenshot", main, also=(FileExistsError, FileNotFoundError, TimeoutError))


if __name__ == "__main__":
    entrypoint()
