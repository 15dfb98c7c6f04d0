"""Frames per second of the viewer's render call, ``EVolSplatModel.get_outputs_for_camera``.

The cameras are built as nerfstudio's viewer builds them (``CameraState`` -> ``get_camera``) along
a short fly-through of the shown segment: starting at its first keyframe view (OpenGL
camera-to-segment), moving forward along the viewing axis while yawing a little, so the nearest
source views change now and then (those frames re-encode, as they would in the viewer). The first
frame (encode + lazy initialisation) is excluded. The pipeline comes from a trained run
(``--load-config``, as ns-viewer loads it) or, for timing only, from a dataset with untrained
weights (``--data``; ``bench_setup.py``'s flags pick the point cloud, e.g. 1M Gaussians).

In the same run, on the same Gaussians (those the last frame rendered, same camera and size):
raw ``gsplat.rasterization`` alone (foreground, and foreground + sky dome in one call), and the
ratio of a cached-encoding frame to it; the feed-forward reconstruction (``encode``) once warm;
and, when the dataset has another segment, the first frame after a segment switch (its node
already built, as when a viewer goes back to a segment it showed before).

    python benchmarks/viewer_fps.py --load-config outputs/.../config.yml --width 960 --height 640
    python benchmarks/viewer_fps.py --data data/demo --method evolsplat --frames 60
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.viewer.utils import CameraState, get_camera

from bench_setup import add_pointcloud_args, apply_pointcloud_args, set_field


def load_pipeline(args: argparse.Namespace):
    """The evolsplat pipeline of a trained run (eval mode), or an untrained one on ``--data``."""
    if args.load_config is not None:
        from nerfstudio.utils.eval_utils import eval_setup

        return eval_setup(args.load_config, test_mode="inference")[1]
    from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config

    config = (evolsplat_config if args.method == "evolsplat" else evolsplat_lite_config)().pipeline
    config.datamanager.data = args.data
    config.datamanager.dataset.preload = False
    apply_pointcloud_args(config, args)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call (CUDA synchronised)."""
    times = []
    for i in range(iters + 1):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i > 0:
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def raw_gsplat_ms(model, camera: Cameras) -> dict[str, float]:
    """ms of ``gsplat.rasterization`` alone on the Gaussians ``model`` renders for ``camera``
    (as the model calls it: RGB+ED, unpacked, SH), foreground only and with the sky dome."""
    from gsplat import rasterization

    from evolsplat_ns.data.cameras import camera_to_opencv
    from evolsplat_ns.geometry import invert_rigid

    c2w, K, W, H = camera_to_opencv(camera.to(model.device))
    state = model._encode_nearest(model.context, c2w)
    fg = model.predictor.predict(state, c2w, K)
    bg = model.predictor.predict_background(state)
    viewmat, Ks = invert_rigid(c2w)[None], K[None]
    sets = {"foreground": [fg]} | ({"with_sky": [fg, bg]} if bg is not None else {})
    out = {}
    for name, parts in sets.items():
        g = [torch.cat([getattr(p, f).float() for p in parts]) for f in ("means", "quats", "scales", "opacities", "sh")]
        out[name] = median_ms(lambda: rasterization(*g, viewmat, Ks, W, H, sh_degree=model.config.sh_degree,
                                                    packed=False, render_mode="RGB+ED"), model.device)
    return out


@torch.no_grad()
def encode_ms(model) -> float:
    """Feed-forward reconstruction of the shown segment from its nearest sources, once warm."""
    ctx = model.context
    views = ctx.sources.select(list(range(min(len(ctx.sources), model.config.num_neighbour_select))))
    return median_ms(lambda: model.encode(views, split_backward=False), model.device, iters=5)


def switch_ms(pipeline, cams: list[Cameras]) -> dict[str, float] | None:
    """Show another segment (its node built once beforehand), then time the switch and the first
    frame; None when the dataset has a single segment."""
    segments = pipeline.datamanager.dataset.segments
    if len(segments) < 2:
        return None
    here = pipeline.shown.segment_index or 0
    other = (here + 1) % len(segments)
    pipeline.show_segment(other)  # first visit: point cloud + anchor Gaussians (not timed)
    pipeline.show_segment(here)
    model = pipeline.model
    _sync(model.device)
    start = time.perf_counter()
    pipeline.show_segment(other)
    _sync(model.device)
    mid = time.perf_counter()
    start_c2w = pipeline.shown.cameras.camera_to_worlds[0].float()
    cam = fly_through(start_c2w, 1, 0.0, cams[0].width.item() / cams[0].height.item(), int(cams[0].height.item()),
                      60.0)[0]
    model.get_outputs_for_camera(cam.to(model.device))
    _sync(model.device)
    end = time.perf_counter()
    return {"switch_ms": 1e3 * (mid - start), "first_frame_ms": 1e3 * (end - mid)}


def profile_frames(model, camera: Cameras, frames: int, table: Path | None) -> dict:
    """Per cached-encoding frame of ``camera`` (rendered ``frames`` times): kernel launches, host
    syncs and GPU busy ms (torch.profiler, as ``train_throughput.profile_pass`` counts them)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from train_throughput import _LAUNCH_NAMES, _SYNC_NAMES, _union_us, device_events, idle_by_phase, sync_sites_of

    model.get_outputs_for_camera(camera.to(model.device))  # the encoding is cached from here
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(frames):
            model.get_outputs_for_camera(camera.to(model.device))
        _sync(model.device)
    if table is not None:
        table.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=50))
    events = prof.events()
    device = device_events(events)
    names = [e.name for e in events if e.device_type == DeviceType.CPU]
    kernels: Counter = Counter()
    for e in device:
        kernels[e.name[:90]] += e.time_range.elapsed_us()
    return {"top_kernels_ms_per_frame": {k: round(v / 1e3 / frames, 3) for k, v in kernels.most_common(12)},
            "launches_per_frame": sum(n in _LAUNCH_NAMES for n in names) / frames,
            "syncs_per_frame": sum(n in _SYNC_NAMES for n in names) / frames,
            "gpu_busy_ms_per_frame": _union_us([(e.time_range.start, e.time_range.end) for e in device]) / 1e3 / frames,
            "gpu_idle_ms_per_frame_by_phase": idle_by_phase(events, frames),
            "sync_sites_per_frame": sync_sites_of(lambda: [model.get_outputs_for_camera(camera.to(model.device))
                                                           for _ in range(frames)], frames)}


def measure(pipeline, frames: int, step: float, width: int, height: int, fov: float,
            profile: int = 0, profile_table: Path | None = None) -> dict:
    """Every figure of this benchmark for ``pipeline``'s shown segment (printed and returned)."""
    model = pipeline.model
    start = pipeline.shown.cameras.camera_to_worlds[0].float()
    cams = fly_through(start, frames + 1, step, width / height, height, fov)
    times = timed_renders(model, cams)
    steady = sorted(times[1:])
    cache = model.context.segment.encoded
    print(f"device={model.device} threads={torch.get_num_threads()} segment={model.context.key} "
          f"gaussians={len(model.context.node.means)} sources/frame="
          f"{model.render_num_sources or model.config.num_neighbour_select} {width}x{height}")
    median = 1e3 * steady[len(steady) // 2]
    print(f"first frame {1e3 * times[0]:.1f} ms; next {len(steady)} frames: "
          f"{len(steady) / sum(steady):.2f} FPS (median {median:.2f} ms/frame, "
          f"encode cache {cache.hits} hits / {cache.misses} misses)")
    result = {"device": str(model.device), "size": f"{width}x{height}",
              "gaussians": len(model.context.node.means), "first_frame_ms": 1e3 * times[0],
              "fps": len(steady) / sum(steady), "median_ms_per_frame": median,
              "cache_hits": cache.hits, "cache_misses": cache.misses}
    if model.device.type == "cuda":
        raw = raw_gsplat_ms(model, cams[-1])
        result["raw_gsplat_ms"] = raw
        result["ratio_to_raw_gsplat"] = median / raw["foreground"]
        print(f"raw gsplat.rasterization on the same Gaussians: {raw['foreground']:.2f} ms (foreground), "
              f"{raw.get('with_sky', float('nan')):.2f} ms (with sky dome); this frame / raw = "
              f"{result['ratio_to_raw_gsplat']:.2f}x")
        if profile > 0:
            result["profile"] = profile_frames(model, cams[-1], profile, profile_table)
            print(f"profiled frame: {result['profile']}")
    result["encode_ms"] = encode_ms(model)
    print(f"feed-forward reconstruction (encode, warm): {result['encode_ms']:.1f} ms")
    switch = switch_ms(pipeline, cams)
    if switch is not None:
        result.update({"segment_switch_ms": switch["switch_ms"], "first_frame_after_switch_ms": switch["first_frame_ms"]})
        print(f"segment switch {switch['switch_ms']:.1f} ms, first frame after it {switch['first_frame_ms']:.1f} ms")
    return result


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
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--profile-frames", type=int, default=0,
                        help="CUDA: frames under torch.profiler (launches, syncs, GPU busy per frame)")
    parser.add_argument("--profile-table", type=Path, default=None, help="write the profiler's op table here")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a render-time setting of the loaded pipeline, e.g. model.config.cuda_graph_render=True")
    add_pointcloud_args(parser)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    pipeline = load_pipeline(args)
    for flag in args.set:
        set_field(pipeline, flag)
    if args.segment is not None:
        pipeline.show_segment(args.segment)
    result = measure(pipeline, args.frames, args.step, args.width, args.height, args.fov, args.profile_frames,
                     args.profile_table)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
