"""Validate a drivestudio-layout dataset and summarise it (``evolsplat-data inspect``).

Every problem is collected as a :class:`DatasetError` naming the file, so one run lists all that
is wrong rather than stopping at the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.segments import split_segments

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
        n = len(self.errors)
        lines.append("OK" if n == 0 else f"INVALID: {n} problem(s)")
        return "\n".join(lines)


def inspect_dataset(data: str | Path, segment_length: int = 20, segment_stride: int = 10,
                    decode_images: bool = True, max_errors_per_scene: int = 20) -> DatasetReport:
    """Check every scene under ``data``. Raises DatasetError only if no scene can be found."""
    scenes = L.find_scenes(data)
    return DatasetReport(Path(data), [
        _inspect_scene(p, segment_length, segment_stride, decode_images, max_errors_per_scene) for p in scenes])


def _inspect_scene(root: Path, seg_len: int, seg_stride: int, decode: bool, max_errors: int) -> SceneReport:
    rep = SceneReport(root.name)
    try:
        lay = L.SceneLayout.scan(root)
    except L.DatasetError as e:
        rep.errors.append(e)
        return rep
    rep.frames = len(lay.frames)
    rep.camera_names = lay.camera_names()
    rep.segments = len(split_segments(lay.frames, seg_len, seg_stride))
    rep.modalities = [m for m in OPTIONAL if lay.has(m)]

    def check(fn, *args):
        if len(rep.errors) >= max_errors:
            return None
        try:
            return fn(*args)
        except L.DatasetError as e:
            rep.errors.append(e)
            return None

    for c in lay.cameras:
        check(L.read_intrinsics, lay.intrinsics_path(c))
        check(L.read_matrix4, lay.extrinsics_path(c))
    for t in lay.frames:
        check(L.read_matrix4, lay.ego_pose_path(t))
    _check_images(lay, rep, check, decode)
    if "lidar" in rep.modalities:
        counts = [check(L.read_lidar, lay.lidar_path(t)) for t in lay.frames]
        n = [len(x) for x in counts if x is not None]
        if n:
            rep.lidar_points = (min(n), float(np.mean(n)), max(n))
    if "instances" in rep.modalities:
        check(L.read_json, lay.instances_info_path)
    _check_per_frame_files(lay, rep, check)
    return rep


def _check_per_frame_files(lay: L.SceneLayout, rep: SceneReport, check) -> None:
    """A modality found on the first frame must exist for every frame and camera: the loaders read
    it for any frame a segment uses. Flow is from t to t + 1, so the last frame may lack it."""
    paths = {"sky_masks": lay.sky_mask_path, "dynamic_masks": lay.dynamic_mask_path,
             "depth": lay.depth_path, "flow": lay.flow_path}
    for modality in (m for m in paths if m in rep.modalities):
        frames = lay.frames[:-1] if modality == "flow" else lay.frames
        for t in frames:
            for c in lay.cameras:
                path = paths[modality](t, c)
                if not path.is_file():
                    check(_raise, path, f"missing file (other frames have {modality})")


def _check_images(lay: L.SceneLayout, rep: SceneReport, check, decode: bool) -> None:
    for c in lay.cameras:
        for t in lay.frames:
            size = check(L.read_image_size, lay.image_path(t, c), decode)
            if size is None:
                continue
            if c not in rep.cameras:
                rep.cameras[c] = size
            elif rep.cameras[c] != size:
                check(_raise, lay.image_path(t, c),
                      f"image size {size[0]}x{size[1]} differs from camera {c}'s {rep.cameras[c][0]}x{rep.cameras[c][1]}")


def _raise(path: Path, problem: str) -> None:
    raise L.DatasetError(path, problem)
