"""``evolsplat-synth``: write synthetic driving scenes in the drivestudio layout.

Example::

    evolsplat-synth --out data/synth --scenes 2 --frames 40 --cameras 3 --width 480 --height 320 --seed 0

Flags mirror :class:`evolsplat_ns.data.synth.SynthConfig` (``--lidar-beams``, ``--no-shadows``, ...).
``--raycaster torch --device cuda`` generates without open3d, e.g. on a GPU machine (``auto``, the
default, takes open3d where it imports and torch elsewhere).
Existing non-empty scene folders are never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from evolsplat_ns.data.synth.config import SynthConfig

# SynthConfig's field annotations are strings (postponed evaluation); these are the ones it uses.
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def build_parser() -> argparse.ArgumentParser:
    """Parser with ``--out`` plus one flag per ``SynthConfig`` field (help from field metadata)."""
    parser = argparse.ArgumentParser(
        prog="evolsplat-synth", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write synthetic driving scenes (ray-cast procedural streets) in the drivestudio layout.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder; scenes go to OUT/000, ...")
    for f in fields(SynthConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kind = _FIELD_TYPES[f.type]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    return parser


def entrypoint(argv: list[str] | None = None) -> None:
    """Console script: parse flags, generate the scenes, print a summary; exit 2 on refusals."""
    from evolsplat_ns.data.synth.generate import SceneExistsError, generate_dataset
    from evolsplat_ns.data.synth.sensors import describe_raycaster

    args = vars(build_parser().parse_args(argv))
    out = args.pop("out")
    try:
        cfg = SynthConfig(**args)
    except ValueError as e:  # name the flag, not the dataclass field
        flag = re.sub(r"SynthConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        sys.exit(f"evolsplat-synth: {flag}")
    try:
        backend = describe_raycaster(cfg.raycaster, cfg.device)
    except ValueError as e:  # open3d asked for but absent, CUDA asked for but absent
        sys.exit(f"evolsplat-synth: {e}")
    start = time.perf_counter()
    try:
        scenes = generate_dataset(cfg, out)
    except SceneExistsError as e:
        print(f"evolsplat-synth: {e}", file=sys.stderr)
        sys.exit(2)
    seconds = time.perf_counter() - start
    print(f"evolsplat-synth: wrote {len(scenes)} scene(s) x {cfg.frames} frames x {cfg.cameras} cameras "
          f"({cfg.width}x{cfg.height}) to {out} in {seconds:.1f} s "
          f"({seconds / (len(scenes) * cfg.frames):.2f} s/frame; ray casting: {backend})")
    for path in scenes:
        print(f"  {path}")


if __name__ == "__main__":
    entrypoint()
