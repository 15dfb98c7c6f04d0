"""``evolsplat-train``: ns-train with a preset file.

    evolsplat-train --preset configs/waymo_full.yaml [ns-train flags ...]
    evolsplat-train --preset configs/demo_cpu.yaml --print-only
    evolsplat-train METHOD [ns-train flags ...]        (no preset: exactly ns-train)
    torchrun --nproc_per_node 2 $(which evolsplat-train) evolsplat-lite --data DIR   (docs/distributed.md)

The preset (see :mod:`evolsplat_ns.presets`) is first validated against its method's registered
config, so a typo or a wrong type is reported with the file and dotted key. Then ns-train runs as
``ns-train METHOD <preset flags> <your flags>``: later flags win in tyro, so anything given on this
command line overrides the preset. ``--print-only`` prints that ns-train command instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from evolsplat_ns.presets import PresetError, apply_overrides, load_preset, preset_to_cli_args

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig


def registered_method_config(method: str, preset: Path) -> TrainerConfig:
    """The ``TrainerConfig`` ns-train registers as ``method`` (nerfstudio's and plugin methods)."""
    from nerfstudio.configs.method_configs import all_methods  # slow import (~7 s): only when needed

    if method not in all_methods:
        raise PresetError(f"{preset}: method '{method}' is not a registered ns-train method; "
                          f"registered: {', '.join(sorted(all_methods))}")
    return all_methods[method]


def ns_train_args(preset: Path, extra: list[str]) -> list[str]:
    """ns-train's arguments for ``preset`` followed by ``extra``, after validating the preset."""
    method, overrides = load_preset(preset)
    apply_overrides(registered_method_config(method, preset), overrides, source=str(preset))
    return [method, *preset_to_cli_args(overrides), *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="evolsplat-train", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="All other arguments go to ns-train after the preset's flags (ns-train METHOD --help lists them).")
    parser.add_argument("--preset", type=Path, help="preset YAML file, e.g. configs/waymo_full.yaml (without it "
                        "the arguments go to ns-train unchanged)")
    parser.add_argument("--print-only", action="store_true", help="print the ns-train command and exit")
    # allow_abbrev=False: otherwise argparse would read an ns-train flag like --pre... as --preset.
    args, extra = parser.parse_known_args(argv)
    try:
        ns_args = ns_train_args(args.preset, extra) if args.preset is not None else extra
    except PresetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_only:
        print(shlex.join(["ns-train", *ns_args]))
        return 0
    from nerfstudio.scripts.train import entrypoint as ns_train

    sys.argv = ["ns-train", *ns_args]  # ns-train's tyro parser reads sys.argv
    ns_train()
    return 0


def entrypoint() -> None:
    from evolsplat_ns._compat.process import prepare_process

    prepare_process()  # third-party warnings filtered, ffmpeg on PATH
    sys.exit(main())


if __name__ == "__main__":  # python -m evolsplat_ns.cli.train, torchrun -m evolsplat_ns.cli.train
    entrypoint()
