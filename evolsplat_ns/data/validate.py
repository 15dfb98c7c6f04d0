"""One validator for drivestudio scenes, shared by ``evolsplat-data inspect`` and training start-up.

It checks what the loaders would otherwise read silently wrong or fail on much later: structure
(every frame's files, consecutive frame numbers, enough frames), calibration plausibility (focal
length against image size, principal point inside the image), sizes (masks, depth and flow equal
their camera's image size), LiDAR values (empty files, NaN, absurd coordinates, every point at the
origin), poses (rigid, finite, not astronomically far) and the instance JSON schema (an object of
instances whose ``obj_to_world`` are 4x4 rigid matrices).

Two depths:

- ``full=False`` (default, what training runs before step 0): headers of images, masks and
  ``.npy`` files (size, shape, dtype, and a truncation check from the file's end marker or size);
  LiDAR, poses, calibration and JSON are read completely (they are small next to the images).
- ``full=True``: additionally decodes every image and mask and loads every depth/flow array.

Each problem is a :class:`~evolsplat_ns.data.layout.DatasetError` naming the file, the problem and
the fix; ``warnings`` are odd-but-usable findings in the same form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

import numpy as np

from evolsplat_ns.data import layout as L
from evolsplat_ns.geometry import is_rigid

T = TypeVar("T")

MAX_COORDINATE_M = 1e4
"""LiDAR points (vehicle frame) farther than this on any axis are not a real sweep (Waymo: ~75 m)."""
MAX_POSE_TRANSLATION_M = 1e7
"""Ego positions farther than this from the world origin are not on Earth (radius 6.4e6 m)."""
FOV_ERROR_DEG = (0.5, 170.0)
"""A pinhole field of view outside this range means the focal length is in the wrong unit."""
FOV_WARN_DEG = (3.0, 140.0)
DYNAMIC_KINDS = L.DYNAMIC_CLASSES


@dataclass
class SceneValidation:
    """What one scene's check found. ``layout`` is None when the folder could not be indexed."""

    root: Path
    layout: Optional[L.SceneLayout] = None
    errors: list[L.DatasetError] = field(default_factory=list)
    warnings: list[L.DatasetError] = field(default_factory=list)
    camera_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Camera id -> (W, H) of its first frame's image."""
    lidar_counts: list[int] = field(default_factory=list)
    """Points per LiDAR file, for the frames that have a readable one."""


class DatasetValidationError(L.DatasetError):
    """Problems found before training; the message lists them (each naming its file)."""

    def __init__(self, data: Path, problems: list[L.DatasetError], shown: int = 10):
        lines = [str(p) for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"... and {len(problems) - shown} more")
        super().__init__(data, f"{len(problems)} problem(s) in the data",
                         f"fix them; `evolsplat-data inspect --data {data} --full` lists all:\n  " + "\n  ".join(lines))
        self.problems = problems


class _Checker:
    """Runs checks, collecting DatasetErrors (up to ``max_errors``) instead of stopping."""

    def __init__(self, result: SceneValidation, max_errors: int):
        self.result = result
        self.max_errors = max_errors

    def __call__(self, fn: Callable[..., T], *args) -> Optional[T]:
        if len(self.result.errors) >= self.max_errors:
            return None
        try:
            return fn(*args)
        except L.DatasetError as e:
            self.result.errors.append(e)
            return None

    def warn(self, path: Path, problem: str, fix: Optional[str] = None) -> None:
        self.result.warnings.append(L.DatasetError(path, problem, fix))


def validate_scene(root: Path, full: bool = False, min_frames: int = 1, max_errors: int = 20) -> SceneValidation:
    """Check one scene folder; never raises a DatasetError (they are collected).

    ``min_frames``: fewer frames is an error (training passes its source + target keyframes).
    """
    result = SceneValidation(Path(root))
    try:
        lay = L.SceneLayout.scan(root)
    except L.DatasetError as e:
        result.errors.append(e)
        return result
    result.layout = lay
    check = _Checker(result, max_errors)
    _check_frames(lay, check, min_frames)
    _check_images(lay, check, full)
    for c in lay.cameras:
        intr = check(L.read_intrinsics, lay.intrinsics_path(c))
        check(L.read_matrix4, lay.extrinsics_path(c))
        if intr is not None and c in result.camera_sizes:
            _check_intrinsics(lay.intrinsics_path(c), intr, result.camera_sizes[c], check)
    for t in lay.frames:
        pose = check(L.read_matrix4, lay.ego_pose_path(t))
        if pose is not None:
            check(_check_pose_position, lay.ego_pose_path(t), pose)
    if lay.has("lidar"):
        _check_lidar(lay, check)
    _check_per_frame_files(lay, check, full)
    if lay.has("instances"):
        check(_check_instances, lay.instances_info_path, lay.frames, check)
        if lay.frame_instances_path.is_file():
            check(_check_frame_instances, lay.frame_instances_path)
    return result


def validate_scenes(roots: Iterable[Path], full: bool = False, min_frames: int = 1) -> list[SceneValidation]:
    return [validate_scene(r, full, min_frames) for r in roots]


def raise_on_errors(data: Path, results: list[SceneValidation]) -> list[L.DatasetError]:
    """DatasetValidationError listing every error of ``results``; else returns their warnings."""
    errors = [e for r in results for e in r.errors]
    if errors:
        raise DatasetValidationError(Path(data), errors)
    return [w for r in results for w in r.warnings]


# ----------------------------------------------------------------------------- structure


def _check_frames(lay: L.SceneLayout, check: _Checker, min_frames: int) -> None:
    img_dir = lay.root / "images"
    views = len(lay.frames) * len(lay.cameras)
    if views < 2:
        check(_raise, img_dir, f"only {len(lay.frames)} frame(s) of {len(lay.cameras)} camera(s); a sample needs "
              "one target view and at least one other source view", "add frames or cameras, or leave this scene "
              "out of the dataset folder")
    elif len(lay.frames) < max(min_frames, 2):
        check.warn(img_dir, f"only {len(lay.frames)} frame(s) (the settings ask for {min_frames} keyframes per "
                   "sample): sources and targets adapt (docs/data_formats.md, short sequences)")
    missing = sorted(set(range(lay.frames[0], lay.frames[-1] + 1)) - set(lay.frames))
    if missing:
        shown = ", ".join(f"{t:03d}" for t in missing[:5]) + (" ..." if len(missing) > 5 else "")
        check(_raise, img_dir, f"frame numbering has {len(missing)} gap(s): no images for frame(s) {shown} "
              f"between {lay.frames[0]:03d} and {lay.frames[-1]:03d}",
              "restore the missing frames' files, or renumber the frames consecutively (all modalities)")
    if lay.frames[0] != 0:
        check.warn(img_dir, f"frames start at {lay.frames[0]:03d}, not 000")


def _check_images(lay: L.SceneLayout, check: _Checker, full: bool) -> None:
    sizes = check.result.camera_sizes
    for c in lay.cameras:
        for t in lay.frames:
            path = lay.image_path(t, c)
            size = check(_image_size, path, full, "image")
            if size is None:
                continue
            if c not in sizes:
                sizes[c] = size
            elif sizes[c] != size:
                check(_raise, path, f"image size {size[0]}x{size[1]} differs from camera {c}'s "
                      f"{sizes[c][0]}x{sizes[c][1]}")


def _image_size(path: Path, full: bool, what: str) -> tuple[int, int]:
    """(W, H) from the header; ``full`` decodes the pixels, else the end marker shows truncation."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if full:
                im.load()
            size, kind = im.size, im.format
    except (OSError, SyntaxError) as e:
        raise L.DatasetError(path, f"unreadable {what} ({e})") from None
    if not full:
        _check_end_marker(path, kind, what)
    return size


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def _check_end_marker(path: Path, kind: Optional[str], what: str) -> None:
    marker = _END_MARKERS.get(kind or "")
    if marker is None:
        return
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 1024))
        tail = f.read()
    if marker not in tail:
        raise L.DatasetError(path, f"unreadable {what} (file is truncated: no {kind} end marker)",
                             "re-export or re-copy the file")


def _raise(path: Path, problem: str, fix: Optional[str] = None) -> None:
    raise L.DatasetError(path, problem, fix)


# ----------------------------------------------------------------------------- calibration, poses


def _fov_deg(focal: float, extent: int) -> float:
    return math.degrees(2 * math.atan(extent / (2 * focal)))


def _check_intrinsics(path: Path, intr: np.ndarray, size: tuple[int, int], check: _Checker) -> None:
    """Focal lengths and principal point against the camera's full-resolution image size (W, H)."""
    fu, fv, cu, cv = intr[:4]
    W, H = size
    fix = "intrinsics are fu fv cu cv in pixels of the full-resolution image files"
    for name, f, extent in (("fu", fu, W), ("fv", fv, H)):
        fov = _fov_deg(f, extent)
        if not FOV_ERROR_DEG[0] <= fov <= FOV_ERROR_DEG[1]:
            check(_raise, path, f"focal length {name}={f:g} px is implausible for a {W}x{H} image "
                  f"(field of view {fov:.3g} deg)", fix)
            return
        if not FOV_WARN_DEG[0] <= fov <= FOV_WARN_DEG[1]:
            check.warn(path, f"unusual field of view {fov:.3g} deg from {name}={f:g} px for a {W}x{H} image")
    if not (0 <= cu <= W and 0 <= cv <= H):
        check(_raise, path, f"principal point ({cu:g}, {cv:g}) lies outside the {W}x{H} image", fix)
    elif abs(cu - W / 2) > 0.25 * W or abs(cv - H / 2) > 0.25 * H:
        check.warn(path, f"principal point ({cu:g}, {cv:g}) is far from the centre of the {W}x{H} image")
    if not 0.5 <= fu / fv <= 2.0:
        check.warn(path, f"fu/fv = {fu / fv:.3g}: strongly non-square pixels")


def _check_pose_position(path: Path, pose: np.ndarray) -> None:
    if np.abs(pose[:3, 3]).max() > MAX_POSE_TRANSLATION_M:
        raise L.DatasetError(path, f"ego position {pose[:3, 3].tolist()} is more than {MAX_POSE_TRANSLATION_M:g} m "
                             "from the world origin", "poses are vehicle-to-world in metres")


# ----------------------------------------------------------------------------- LiDAR


def _check_lidar(lay: L.SceneLayout, check: _Checker) -> None:
    for t in lay.frames:
        path = lay.lidar_path(t)
        pts = check(L.read_lidar, path)
        if pts is None:
            continue
        if check(_check_sweep, path, pts) is not None:
            check.result.lidar_counts.append(len(pts))


def _check_sweep(path: Path, pts: np.ndarray) -> bool:
    fix = "re-export this frame's LiDAR, or remove lidar/ to build point clouds from depth"
    if len(pts) == 0:
        raise L.DatasetError(path, "empty LiDAR file (0 points)", fix)
    xyz = pts[:, 3:6]
    far = float(np.abs(xyz).max())
    if far > MAX_COORDINATE_M:
        raise L.DatasetError(path, f"LiDAR coordinates up to {far:.3g} m (more than {MAX_COORDINATE_M:g} m "
                             "from the vehicle): not a sweep in metres", fix)
    if not np.any(xyz):
        raise L.DatasetError(path, f"all {len(pts)} LiDAR points are at the origin (0, 0, 0)", fix)
    return True


# ----------------------------------------------------------------------------- masks, depth, flow


def _check_per_frame_files(lay: L.SceneLayout, check: _Checker, full: bool) -> None:
    """A modality found on the first frame must exist for every frame and camera, at the camera's
    image size: the loaders read it for any frame a segment uses (and would otherwise resize it).
    Flow is from t to t + 1, so the last frame may lack it."""
    kinds: dict[str, Callable[[int, int], Path]] = {"sky_masks": lay.sky_mask_path, "depth": lay.depth_path,
                                                    "flow": lay.flow_path}
    if lay.has("dynamic_masks"):
        for kind in DYNAMIC_KINDS:
            if lay.dynamic_mask_path(lay.frames[0], lay.cameras[0], kind).is_file():
                kinds[f"dynamic_masks/{kind}"] = lambda t, c, k=kind: lay.dynamic_mask_path(t, c, k)
    for modality, path_fn in kinds.items():
        if not path_fn(lay.frames[0], lay.cameras[0]).is_file():
            continue
        frames = lay.frames[:-1] if modality == "flow" else lay.frames
        for c in lay.cameras:
            size = check.result.camera_sizes.get(c)
            for t in frames:
                path = path_fn(t, c)
                if not path.is_file():
                    check(_raise, path, f"missing file (other frames have {modality.split('/')[0]})")
                elif size is not None:
                    check(_check_dense, path, modality, size, full)


def _check_dense(path: Path, modality: str, size: tuple[int, int], full: bool) -> None:
    W, H = size
    fix = "masks, depth and flow are stored at their camera's image resolution"
    if modality in ("depth", "flow"):
        shape = _npy_shape(path, full, modality)
        want = (H, W) if modality == "depth" else (H, W, 2)
        if shape != want:
            raise L.DatasetError(path, f"{modality} array has shape {list(shape)}, expected {list(want)} "
                                 f"for the {W}x{H} image", fix)
        return
    mask_size = _image_size(path, full, "mask")
    if mask_size != size:
        raise L.DatasetError(path, f"mask size {mask_size[0]}x{mask_size[1]} differs from its image's {W}x{H}", fix)


def _npy_shape(path: Path, full: bool, modality: str) -> tuple[int, ...]:
    """Shape from the ``.npy`` header, checking the file holds all its data; ``full`` loads it."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            data_start = f.tell()
        expected = data_start + int(np.prod(shape)) * dtype.itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise ValueError(f"truncated: {actual} of {expected} bytes")
        if full:
            arr = np.load(path)
            if not np.all(np.isfinite(arr)):
                raise ValueError("contains NaN or Inf")
            if modality == "depth" and np.any(arr < 0):
                raise ValueError("negative depth values")
    except (OSError, ValueError, EOFError) as e:
        raise L.DatasetError(path, f"unreadable {modality} array ({e})", "re-export the file") from None
    return tuple(shape)


# ----------------------------------------------------------------------------- instances

_INSTANCES_FIX = ('drivestudio format: {"<id>": {"class_name": str, "frame_annotations": {"frame_idx": [t, ...], '
                  '"obj_to_world": [4x4, ...], "box_size": [[l, w, h], ...]}}}')


def _check_instances(path: Path, frames: list[int], check: _Checker) -> None:
    info = L.read_json(path)
    if not isinstance(info, dict):
        raise L.DatasetError(path, f"must be a JSON object of instances keyed by id, found a JSON "
                             f"{type(info).__name__}", _INSTANCES_FIX)
    problems: list[str] = []
    outside = 0
    frame_set = set(frames)
    for iid, inst in info.items():
        problem, n_outside = _instance_problem(inst, frame_set)
        outside += n_outside
        if problem:
            problems.append(f"instance {iid}: {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more instance(s) with problems)" if len(problems) > 1 else ""
        raise L.DatasetError(path, problems[0] + more, _INSTANCES_FIX)
    if outside:
        check.warn(path, f"{outside} box annotation(s) name frames the scene does not have (ignored)")


def _instance_problem(inst: object, frame_set: set[int]) -> tuple[Optional[str], int]:
    """The first schema problem of one instance (or None) and its annotations outside the scene."""
    if not isinstance(inst, dict) or not isinstance(inst.get("frame_annotations"), dict):
        return "no frame_annotations object", 0
    ann = inst["frame_annotations"]
    keys = ("frame_idx", "obj_to_world", "box_size")
    absent = [k for k in keys if not isinstance(ann.get(k), list)]
    if absent:
        return f"frame_annotations has no {', '.join(absent)} list", 0
    lengths = {k: len(ann[k]) for k in keys}
    if len(set(lengths.values())) > 1:
        return f"frame_annotations lists differ in length {lengths}", 0
    outside = 0
    for t, T, size in zip(ann["frame_idx"], ann["obj_to_world"], ann["box_size"]):
        try:
            M, s, frame = np.asarray(T, dtype=np.float64), np.asarray(size, dtype=np.float64), int(t)
        except (TypeError, ValueError):
            return f"annotation {t!r} is not numeric", outside
        if M.shape != (4, 4):
            return f"frame {frame}: obj_to_world has shape {list(M.shape)}, expected a 4x4 rigid matrix", outside
        if not is_rigid(M):
            return f"frame {frame}: obj_to_world is not a rigid transform", outside
        if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
            return f"frame {frame}: box_size {size!r} is not 3 positive numbers (l w h)", outside
        outside += frame not in frame_set
    return None, outside


def _check_frame_instances(path: Path) -> None:
    data = L.read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise L.DatasetError(path, "must be a JSON object of frame index -> list of instance ids",
                             'e.g. {"0": [3, 7], "1": [3]}')
