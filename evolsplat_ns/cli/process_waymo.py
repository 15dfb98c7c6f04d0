"""``evolsplat-process-waymo``: raw Waymo Open Dataset v1 TFRecords -> drivestudio scene folders.

Example::

    evolsplat-process-waymo --source raw/training --out data/waymo/processed/training --workers 4

No TensorFlow is needed; see docs/waymo.md for what is produced.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from evolsplat_ns.data.waymo.convert import (
    SKY_MASK_NOTE, SegmentResult, find_sources, plan_jobs, run_jobs,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evolsplat-process-waymo", description=__doc__.splitlines()[0])
    p.add_argument("--source", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="segment .tfrecord files and/or folders holding them")
    p.add_argument("--out", required=True, help="output folder, e.g. data/waymo/processed/training")
    p.add_argument("--scenes", nargs="+", type=int, default=None, metavar="IDX",
                   help="indices into the sorted segment files (default: all); folder NNN = index")
    p.add_argument("--workers", type=int, default=1, help="segments converted in parallel")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing scene folders (complete or not) instead of skipping/refusing")
    return p


def _progress(stream: Iterator[SegmentResult], total: int) -> Iterator[SegmentResult]:
    from tqdm import tqdm

    return tqdm(stream, total=total, desc="segments", unit="seg")


def _report(results: list[SegmentResult]) -> int:
    """Print one line per scene; the exit code is 1 if any segment failed."""
    for r in results:
        detail = (f"{r.frames} frames, {r.lidar_points} LiDAR points, {r.seconds:.1f} s"
                  if r.status == "converted" else r.message)
        print(f"{r.scene} {r.status:9s} {r.source}: {detail}")
    if any(r.status == "converted" and r.lidar_points == 0 for r in results):
        print("note: some segments carry no LiDAR range images; their scenes have no lidar/ folder")
    print(SKY_MASK_NOTE)
    return int(any(r.status == "failed" for r in results))


def entrypoint(argv: list[str] | None = None) -> int:
    """Parse arguments, convert, print a per-scene report; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.workers < 1:
        _parser().error("--workers must be >= 1")
    try:
        jobs = plan_jobs(find_sources(args.source), Path(args.out), args.scenes)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _report(run_jobs(jobs, args.workers, args.overwrite, _progress))


if __name__ == "__main__":
    sys.exit(entrypoint())
