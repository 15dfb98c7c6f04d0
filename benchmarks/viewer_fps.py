"""Frames per second of the viewer's render call, ``EVolSplatModel.get_outputs_for_camera``.

The cameras are built as nerfstudio's viewer builds them (``CameraState`` -> ``get_camera``) along
a short fly-through of the shown segment: starting at its first keyframe view (OpenGL
camera-to-segment), moving forward along the viewing axis while yawing a little, so the nearest
source views change now and then (those frames re-encode, as they would in the viewer). The first
frame (encode + lazy initialisation) is excluded. The pipeline comes from a trained run
(``--load-config``, as ns-viewer loads it) or, for timing only, from a dataset with untrained
weights (``--data``).

    python benchmarks/viewer_fps.py --load-config outputs/.../config.yml --width 960 --height 640
    python benchmarks/viewer_fps.py --data data/demo --method evolsplat --frames 60
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.viewer.utils import CameraState, get_camera


def load_pipeline(args: argparse.Namespace):
    """The evolsplat pipeline of a trained run (eval mode), or an untrained one on ``--data``."""
    if args.load_config is not None:
        from nerfstudio.utils.eval_utils import eval_setup

        return eval_setup(args.load_config, test_mode="inference")[1]
    from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config

    config = (evolsplat_config if args.method == "evolsplat" else evolsplat_lite_config)().pipeline
    config.datamanager.data = args.data
    config.datamanager.dataset.preload = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = config.setup(device=device, test_mode="inference")
    pipeline.eval()
    return pipeline


def fly_through(start_c2w: torch.Tensor, frames: int, step_m: float, aspect: float, height: int,
                fov_deg: float) -> list[Cameras]:
    """Viewer cameras moving ``step_m`` per frame along ``start_c2w``'s view axis (OpenGL [3, 4],
    segment frame), yawing +-10 degrees about the camera's up axis."""
    cams = []
    forward, up = -start_c2w[:3, 2], start_c2w[:3, 1]
    for i in range(frames):
        yaw = math.radians(10.0) * math.sin(2 * math.pi * i / max(frames, 1))
        rot = _axis_angle(up, yaw)
        c2w = torch.cat([rot @ start_c2w[:3, :3], (start_c2w[:3, 3] + i * step_m * forward)[:, None]], dim=1)
        state = CameraState(fov=math.radians(fov_deg), aspect=aspect, c2w=c2w, camera_type=CameraType.PERSPECTIVE)
        cams.append(get_camera(state, height, int(round(height * aspect))))
    return cams


def _axis_angle(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotation matrix [3, 3] of ``angle`` radians about unit ``axis`` (Rodrigues)."""
    axis = axis / axis.norm()
    k = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return torch.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def timed_renders(model, cameras: list[Cameras]) -> list[float]:
    """Seconds per ``get_outputs_for_camera`` call (CUDA synchronised)."""
    times = []
    for cam in cameras:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.get_outputs_for_camera(cam.to(model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load-config", type=Path, help="config.yml of a trained run (as for ns-viewer)")
    source.add_argument("--data", type=Path, help="dataset folder: time an untrained pipeline")
    parser.add_argument("--method", choices=("evolsplat", "evolsplat-lite"), default="evolsplat",
                        help="method settings used with --data")
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--fov", type=float, default=60.0, help="vertical field of view, degrees")
    parser.add_argument("--frames", type=int, default=30, help="frames timed after the first")
    parser.add_argument("--step", type=float, default=0.1, help="metres moved per frame")
    parser.add_argument("--segment", type=int, default=None, help="segment index to show (default: as loaded)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    pipeline = load_pipeline(args)
    if args.segment is not None:
        pipeline.show_segment(args.segment)
    model = pipeline.model
    start = pipeline.shown.cameras.camera_to_worlds[0].float()
    cams = fly_through(start, args.frames + 1, args.step, args.width / args.height, args.height, args.fov)
    times = timed_renders(model, cams)
    steady = sorted(times[1:])
    cache = model.context.segment.encoded
    print(f"device={model.device} threads={torch.get_num_threads()} segment={model.context.key} "
          f"gaussians={len(model.context.node.means)} sources/frame="
          f"{model.render_num_sources or model.config.num_neighbour_select} {args.width}x{args.height}")
    print(f"first frame {1e3 * times[0]:.1f} ms; next {len(steady)} frames: "
          f"{len(steady) / sum(steady):.2f} FPS (median {1e3 * steady[len(steady) // 2]:.1f} ms/frame, "
          f"encode cache {cache.hits} hits / {cache.misses} misses)")


if __name__ == "__main__":
    main()
