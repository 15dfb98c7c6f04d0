"""``evolsplat-data``: dataset utilities.

``evolsplat-data inspect --data DIR``: validate and summarise. ``evolsplat-data export-nerfstudio
--data SCENE --out DIR``: one scene as a nerfstudio dataset (transforms.json, images, an initial
point cloud, our held-out split), e.g. for ``ns-train splatfacto --data DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evolsplat_ns.data.inspect import inspect_dataset
from evolsplat_ns.data.layout import DatasetError
from evolsplat_ns.utils.errors import UserError, debug_enabled


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evolsplat-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="validate a drivestudio-layout dataset and print a summary")
    p.add_argument("--data", required=True, help="a scene folder or a folder of scene folders")
    p.add_argument("--segment-length", type=int, default=20, help="frames per segment (0 = whole scene)")
    p.add_argument("--segment-stride", type=_positive_int, default=10, help="frames between segment starts")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--full", action="store_true",
                       help="also decode every image and mask and load every depth/flow array (slow)")
    depth.add_argument("--quick", action="store_true",
                       help="the default: headers and end markers of images, masks and arrays (kept for old scripts)")
    _add_export_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "export-nerfstudio":
        return _export(args)
    try:
        report = inspect_dataset(args.data, args.segment_length, args.segment_stride, full=args.full)
    except DatasetError as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export-nerfstudio", help="one scene as a nerfstudio dataset (transforms.json, images, "
                       "point cloud, held-out split) for splatfacto and other nerfstudio methods")
    p.add_argument("--data", required=True, type=Path, help="one scene folder (drivestudio layout)")
    p.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    p.add_argument("--eval-frame-interval", type=int, default=4,
                   help="hold out every k-th frame (the same rule as training/evolsplat-infer)")
    p.add_argument("--pointcloud-generator", default="auto",
                   help="point-cloud generator for sparse_pc.ply: lidar, depth, hybrid or auto (hybrid with LiDAR and depth maps)")
    p.add_argument("--masks", choices=("none", "dynamic", "sky", "dynamic+sky"), default="none",
                   help="write nerfstudio masks that ignore these pixels")
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")


def _export(args: argparse.Namespace) -> int:
    from evolsplat_ns.data.nerfstudio_export import NerfstudioExport, export_nerfstudio

    try:
        result = export_nerfstudio(NerfstudioExport(args.data, args.out, args.eval_frame_interval,
                                                    args.pointcloud_generator, args.masks, args.copy))
    except (DatasetError, UserError, FileExistsError) as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.out}/transforms.json: {result.num_train} training and {result.num_held_out} held-out "
          f"views (frames {result.held_out_frames}), {result.num_points} points in {result.out}/sparse_pc.ply")
    print(f"train splatfacto on it: ns-train splatfacto --data {result.out}")
    return 0


def entrypoint() -> None:
    sys.exit(main())
