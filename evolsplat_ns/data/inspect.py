"""Validate a drivestudio-layout dataset and summarise it (``evolsplat-data inspect``).

The checks are :mod:`evolsplat_ns.data.validate`'s (the same ones training runs before step 0).
Every problem is collected as a :class:`DatasetError` naming the file, so one run lists all that
is wrong rather than stopping at the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.segments import split_segments
from evolsplat_ns.data.validate import validate_scene

OPTIONAL = ("lidar", "sky_masks", "dynamic_masks", "instances", "depth", "flow")


@dataclass
class SceneReport:
    name: str
    frames: int = 0
    cameras: dict[int, tuple[int, int]] = field(default_factory=dict)
    camera_names: dict[int, str] = field(default_factory=dict)
    lidar_points: tuple[int, float, int] | None = None  # min, mean, max per frame
    modalities: list[str] = field(default_factory=list)
    segments: int = 0
    errors: list[L.DatasetError] = field(default_factory=list)
    warnings: list[L.DatasetError] = field(default_factory=list)


@dataclass
class DatasetReport:
    root: Path
    scenes: list[SceneReport]

    @property
    def errors(self) -> list[L.DatasetError]:
        return [e for s in self.scenes for e in s.errors]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"dataset {self.root}: {len(self.scenes)} scene(s)"]
        for s in self.scenes:
            cams = ", ".join(f"{c} {s.camera_names.get(c, '?')} {w}x{h}" for c, (w, h) in s.cameras.items())
            lidar = "none" if s.lidar_points is None else \
                f"{s.lidar_points[0]}/{s.lidar_points[1]:.0f}/{s.lidar_points[2]} (min/mean/max per frame)"
            lines += [f"  scene {s.name}: {s.frames} frames, {s.segments} segment(s)",
                      f"    cameras: {cams}", f"    lidar points: {lidar}",
                      f"    optional: {', '.join(s.modalities) or 'none'}"]
            lines += [f"    ERROR {e}" for e in s.errors]
            lines += [f"    WARNING {w}" for w in s.warnings]
        n, w = len(self.errors), sum(len(s.warnings) for s in self.scenes)
        lines.append(("OK" if n == 0 else f"INVALID: {n} problem(s)") + (f" ({w} warning(s))" if w else ""))
        return "\n".join(lines)


def inspect_dataset(data: str | Path, segment_length: int = 20, segment_stride: int = 10,
                    full: bool = False, max_errors_per_scene: int = 20) -> DatasetReport:
    """Check every scene under ``data`` (see :mod:`evolsplat_ns.data.validate`; ``full`` decodes
    every image, mask and array). Raises DatasetError only if no scene can be found."""
    return DatasetReport(Path(data), [_inspect_scene(p, segment_length, segment_stride, full, max_errors_per_scene)
                                      for p in L.find_scenes(data)])


def _inspect_scene(root: Path, seg_len: int, seg_stride: int, full: bool, max_errors: int) -> SceneReport:
    checked = validate_scene(root, full=full, max_errors=max_errors)
    rep = SceneReport(root.name, errors=checked.errors, warnings=checked.warnings, cameras=checked.camera_sizes)
    lay = checked.layout
    if lay is None:
        return rep
    rep.frames = len(lay.frames)
    rep.camera_names = lay.camera_names()
    rep.segments = len(split_segments(lay.frames, seg_len, seg_stride))
    rep.modalities = [m for m in OPTIONAL if lay.has(m)]
    n = checked.lidar_counts
    if n:
        rep.lidar_points = (min(n), float(np.mean(n)), max(n))
    return rep
