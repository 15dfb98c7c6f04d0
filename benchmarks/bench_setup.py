"""Shared benchmark settings: which point cloud (hence how many Gaussians) a benchmark runs on.

Reaching ~1M Gaussians per segment on generated data. ``evolsplat-synth`` writes depth maps next to
the images, and the depth generator back-projects every ``--pixel-stride``-th pixel of every frame
of the segment before voxel downsampling (``--pc-voxel-size``). Measured on a 12-frame,
one-camera, 960x640 synthetic scene (``evolsplat-synth --scenes 2 --frames 12 --cameras 1
--width 960 --height 640``; the default 40-frame scenes give more):

    --generator depth --pixel-stride 4 --pc-voxel-size 0.05   ->   184k points (404k raw)
    --generator depth --pixel-stride 2 --pc-voxel-size 0.05   ->   365k points
    --generator depth --pixel-stride 1 --pc-voxel-size 0.05   ->   528k points (6.5M raw)
    --generator depth --pixel-stride 1 --pc-voxel-size 0.02   ->   1.9M points
    --generator depth --pixel-stride 1 --pc-voxel-size 0      ->   5.7M points

``--max-gaussians N`` then subsamples a segment at random to exactly N (e.g. 100000 or 1000000).
Denser LiDAR works too (``evolsplat-synth --lidar-beams 128 --lidar-azimuths 4096``, then
``--generator lidar --pc-voxel-size 0.02``), at ~9 MB of LiDAR per frame; ``--generator hybrid``
unions both. ``--pc-device cuda`` builds the point cloud on the GPU (seconds instead of a minute).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evolsplat_ns.data.pointcloud.base import PointCloudGeneratorConfig
from evolsplat_ns.data.pointcloud.depth import DepthPointCloudConfig
from evolsplat_ns.data.pointcloud.hybrid import HybridPointCloudConfig


def add_pointcloud_args(parser: argparse.ArgumentParser) -> None:
    """Flags choosing the segment point cloud (see this module's docstring for their effect)."""
    g = parser.add_argument_group("point cloud (how many Gaussians; see bench_setup.py)")
    g.add_argument("--generator", default="auto", choices=("auto", "lidar", "depth", "hybrid"),
                   help="point-cloud generator (auto: hybrid with LiDAR + depth maps, lidar with LiDAR only, else depth)")
    g.add_argument("--pixel-stride", type=int, default=None,
                   help="depth/hybrid: back-project every k-th pixel (generator default 4; 1 = every pixel)")
    g.add_argument("--pc-voxel-size", type=float, default=None,
                   help="voxel downsampling of the point cloud in metres (default: the method's; 0 = off)")
    g.add_argument("--pc-device", default="cpu", help="device the point cloud is built on (cpu or cuda)")
    g.add_argument("--max-gaussians", type=int, default=0,
                   help="subsample each segment to at most this many Gaussians (0 = all points)")


def apply_pointcloud_args(config, args: argparse.Namespace) -> None:
    """Apply :func:`add_pointcloud_args`' flags to a trainer or pipeline config (in place)."""
    pipeline = getattr(config, "pipeline", config)
    ds = pipeline.datamanager.dataset
    ds.pointcloud_generator = args.generator
    base = ds.pointcloud
    if args.pixel_stride is not None:
        if args.generator not in ("depth", "hybrid"):
            raise SystemExit("--pixel-stride needs --generator depth or hybrid")
        cls = DepthPointCloudConfig if args.generator == "depth" else HybridPointCloudConfig
        shared = {f: getattr(base, f) for f in PointCloudGeneratorConfig.__dataclass_fields__ if f != "_target"}
        base = ds.pointcloud = cls(**shared, pixel_stride=args.pixel_stride)
    if args.pc_voxel_size is not None:
        base.voxel_size = args.pc_voxel_size
    base.device = args.pc_device
    pipeline.model.max_gaussians_per_segment = args.max_gaussians


def add_synth_args(parser: argparse.ArgumentParser, *, width: int, height: int, moving_cars: int,
                   device: str = "cpu") -> None:
    """``--out``, ``--device`` and the generated scenes' flags (moving cars with noisy boxes; the
    true boxes in ``instances_gt/``) shared by the stage-2 benchmarks; :func:`synth_dataset` makes them."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (generated data in OUT/data)")
    parser.add_argument("--device", default=device)
    g = parser.add_argument_group("generated scenes (written to OUT/data when absent; reused otherwise)")
    g.add_argument("--width", type=int, default=width)
    g.add_argument("--height", type=int, default=height)
    g.add_argument("--scenes", type=int, default=2)
    g.add_argument("--frames", type=int, default=12)
    g.add_argument("--moving-cars", type=int, default=moving_cars)
    g.add_argument("--box-noise-trans", type=float, default=0.3, help="m")
    g.add_argument("--box-noise-rot", type=float, default=3.0, help="degrees")
    g.add_argument("--raycaster", default="auto", choices=("auto", "open3d", "torch"),
                   help="generator's ray caster (torch runs where open3d is missing, e.g. the GPU machine)")
    g.add_argument("--synth-device", default="auto", help="device of the torch ray caster (auto: cuda when available)")


def synth_dataset(args: argparse.Namespace) -> Path:
    """``args.out / "data"``: generated with :func:`add_synth_args`' settings (3 cameras, seed 0)
    unless it exists already (then reused as it is: delete it to change the settings)."""
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    data = args.out / "data"
    if not data.exists():
        generate_dataset(SynthConfig(scenes=args.scenes, frames=args.frames, cameras=3, width=args.width,
                                     height=args.height, moving_cars=args.moving_cars, seed=0,
                                     box_noise_trans=args.box_noise_trans, box_noise_rot=args.box_noise_rot,
                                     raycaster=args.raycaster, device=args.synth_device), data)
    return data


def set_field(cfg, flag: str) -> None:
    """``--set pipeline.model.enable_background=False``: a dotted config field, value as Python literal."""
    import ast

    path, _, text = flag.partition("=")
    *parents, name = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    if not hasattr(obj, name):
        raise SystemExit(f"--set {flag}: {type(obj).__name__} has no field {name!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    setattr(obj, name, value)
