"""``evolsplat-export``: write the Gaussians of a trained run's segments as standard 3DGS PLY files.

Example::

    evolsplat-export gaussian-splat --load-config outputs/demo/evolsplat-lite/RUN/config.yml \\
        --output-dir exports/ [--segment 000/seg000] [--include-background] [--overwrite]

The flags follow ``ns-export gaussian-splat`` (which only accepts splatfacto models, see
docs/export_and_inference.md). Default: every segment of the run's dataset, one
``{scene}_seg{NNN}.ply`` each, in the segment frame (x forward, y left, z up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """``gaussian-splat`` subcommand with ns-export's flags plus segment selection."""
    parser = argparse.ArgumentParser(prog="evolsplat-export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gaussian-splat", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="one 3DGS PLY per segment (x y z, f_dc/f_rest SH, logit opacity, log scale, wxyz rot)")
    p.add_argument("--load-config", type=Path, required=True, help="the run's config.yml")
    p.add_argument("--output-dir", type=Path, required=True, help="folder for {scene}_seg{NNN}.ply files")
    p.add_argument("--segment", action="append", default=[], metavar="KEY",
                   help="segment key SCENE/segNNN or a scene name (repeatable; default: all segments)")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder instead of the run's (new scenes: their segments start fresh)")
    p.add_argument("--include-background", action="store_true", help="also write the sky-dome Gaussians")
    p.add_argument("--actors-at-frame", type=float, default=None, metavar="T",
                   help="pose the moving actors at frame T inside each segment's PLY (default: each actor in its "
                        "own object-frame PLY plus {scene}_seg{NNN}_actors.json with its per-frame poses)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PLY files")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the export; returns the written paths (tests call this directly)."""
    from evolsplat_ns.export.exporter import export_splats, select_segments
    from evolsplat_ns.inference.loading import DatasetOverrides, load_pipeline

    args = build_parser().parse_args(argv)
    _, pipeline, checkpoint = load_pipeline(args.load_config, DatasetOverrides(data=args.data))
    dataset = pipeline.datamanager.dataset
    try:
        segments = select_segments(dataset, args.segment)
        start = time.perf_counter()
        paths = export_splats(pipeline.model, dataset, segments, args.output_dir, args.include_background,
                              args.overwrite, on_written=lambda p, n, key: print(f"wrote segment {key} to {p} ({n} Gaussians)"),
                              actors_at=args.actors_at_frame)
    finally:
        dataset.close()
    print(f"exported {len(paths)} segment(s) from {checkpoint} in {time.perf_counter() - start:.1f} s")
    return paths


def entrypoint() -> None:
    """Console script; refusals (existing files, unknown segments) exit with status 2."""
    from evolsplat_ns._compat.process import prepare_process
    from evolsplat_ns.utils.errors import exit_on_user_error

    prepare_process()  # third-party warnings filtered, ffmpeg on PATH
    exit_on_user_error("evolsplat-export", main, also=(FileExistsError, FileNotFoundError, ValueError))
