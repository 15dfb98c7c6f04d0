"""``evolsplat-data``: dataset utilities. ``evolsplat-data inspect --data DIR``."""

from __future__ import annotations

import argparse
import sys

from evolsplat_ns.data.inspect import inspect_dataset
from evolsplat_ns.data.layout import DatasetError
from evolsplat_ns.utils.errors import debug_enabled


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
    args = parser.parse_args(argv)
    try:
        report = inspect_dataset(args.data, args.segment_length, args.segment_stride, full=args.full)
    except DatasetError as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def entrypoint() -> None:
    sys.exit(main())
