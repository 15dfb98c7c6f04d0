"""The drivestudio processed-Waymo layout: one folder per scene, read and written exactly.

::

    scene/
      images/{t:03d}_{cam}.jpg          cam = 0, 1, ... any number of cameras (Waymo: 0 FRONT, 1 FRONT_LEFT,
                                        2 FRONT_RIGHT, 3 SIDE_LEFT, 4 SIDE_RIGHT); names: cameras.json
      cameras.json                      optional: {"dataset": "nuscenes"} and/or {"names": {"5": "BACK"}}
                                        (see CAMERA_RIGS and docs/data_formats.md)
      intrinsics/{cam}.txt              9 numbers: fu fv cu cv k1 k2 p1 p2 k3 (full-resolution pixels)
      extrinsics/{cam}.txt              4x4 camera-to-vehicle, Waymo camera axes (x fwd, y left, z up)
      ego_pose/{t:03d}.txt              4x4 vehicle-to-world
      lidar/{t:03d}.bin                 float32 N x 14 (see LIDAR_COLUMNS), vehicle frame
      sky_masks/{t:03d}_{cam}.png       optional, 255 = sky
      dynamic_masks/{all,human,vehicle}/{t:03d}_{cam}.png   optional, 255 = dynamic
      instances/instances_info.json     optional, per instance id: class_name, frame_annotations
      instances/frame_instances.json    optional, frame index -> instance ids
      instance_masks/{t:03d}_{cam}.png  optional (evolsplat-ns extension): 16-bit per-pixel instance,
                                        0 = none, k + 1 = instance id k of instances_info.json
      instances_gt/instances_info.json  optional (synthetic, with --box-noise-*): the true boxes when
                                        instances/ holds noisy ones
      depth/{t:03d}_{cam}.npy           optional (evolsplat-ns extension): float32 [H, W] OpenCV
                                        z-depth in metres at image resolution, 0 = unknown
      flow/{t:03d}_{cam}.npy            optional (evolsplat-ns extension): float16 [H, W, 2] pixel
                                        displacement (dx right, dy down) from frame t to t+1, same cam

Distortion: k1 k2 p1 p2 k3 are read and kept (``CameraIntrinsics.distortion``) but not applied;
images are treated as pinhole. Waymo's cameras have small distortion and drivestudio renders
them the same way. Downscaling an image by ``f`` scales fu fv cu cv by new_size / old_size.

Every reader raises :class:`DatasetError` naming the file and the problem.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evolsplat_ns.geometry import is_rigid
from evolsplat_ns.utils.errors import UserError

CAMERA_NAMES = {0: "FRONT", 1: "FRONT_LEFT", 2: "FRONT_RIGHT", 3: "SIDE_LEFT", 4: "SIDE_RIGHT"}
"""Waymo's camera names: the default for scenes whose camera ids are all <= 4 and that name none."""
CAMERA_RIGS: dict[str, tuple[str, ...]] = {
    # drivestudio's processed camera order per dataset (camera id = index).
    "waymo": ("FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT", "SIDE_RIGHT"),
    "nuscenes": ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK"),
    "pandaset": ("front_camera", "front_left_camera", "front_right_camera", "left_camera", "right_camera",
                 "back_camera"),
    "argoverse2": ("ring_front_center", "ring_front_left", "ring_front_right", "ring_side_left",
                   "ring_side_right", "ring_rear_left", "ring_rear_right"),
    "kitti": ("CAM_LEFT", "CAM_RIGHT"),
    "nuplan": ("CAM_F0", "CAM_L0", "CAM_R0", "CAM_L1", "CAM_R1", "CAM_L2", "CAM_R2", "CAM_B0"),
}
"""Known rigs: camera names by id, selected by ``cameras.json``'s ``"dataset"``."""
CAMERAS_FILE = "cameras.json"
LIDAR_COLUMNS = (
    "origin_x", "origin_y", "origin_z", "x", "y", "z", "flow_x", "flow_y", "flow_z",
    "flow_class", "ground", "intensity", "elongation", "laser_id",
)
LIDAR_NUM_COLUMNS = len(LIDAR_COLUMNS)
LIDAR_POINT_BYTES = LIDAR_NUM_COLUMNS * 4
DYNAMIC_CLASSES = ("all", "human", "vehicle")
_IMAGE_RE = re.compile(r"^(\d{3,})_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


class DatasetError(UserError, ValueError):
    """Invalid data on disk. The message names the file, what is wrong and, where known, the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str | None = None):
        self.path = Path(path)
        msg = f"{self.path}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


# ----------------------------------------------------------------------------- readers


def _read_numbers(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(path, "missing file")
    try:
        vals = np.array(path.read_text().split(), dtype=np.float64)
    except ValueError as e:
        raise DatasetError(path, f"not a list of numbers ({e})") from None
    if not np.all(np.isfinite(vals)):
        raise DatasetError(path, "contains NaN or Inf")
    return vals


def read_matrix4(path: str | os.PathLike, rigid: bool = True) -> np.ndarray:
    """Read a 4x4 matrix written as 16 whitespace-separated numbers (row-major)."""
    path = Path(path)
    vals = _read_numbers(path)
    if vals.size != 16:
        raise DatasetError(path, f"expected a 4x4 matrix (16 numbers), found {vals.size} numbers")
    M = vals.reshape(4, 4)
    if rigid and not is_rigid(M):
        raise DatasetError(path, "not a rigid transform (rotation not orthonormal, det != 1, "
                           "or last row != [0 0 0 1])")
    return M


def read_intrinsics(path: str | os.PathLike) -> np.ndarray:
    """Read ``fu fv cu cv k1 k2 p1 p2 k3`` [9] (full-resolution pixels)."""
    path = Path(path)
    vals = _read_numbers(path)
    if vals.size != 9:
        raise DatasetError(path, f"expected 9 numbers (fu fv cu cv k1 k2 p1 p2 k3), found {vals.size}")
    if vals[0] <= 0 or vals[1] <= 0:
        raise DatasetError(path, f"focal lengths must be positive, got fu={vals[0]} fv={vals[1]}")
    return vals


def read_lidar(path: str | os.PathLike) -> np.ndarray:
    """Read a LiDAR sweep as float32 [N, 14] (columns in ``LIDAR_COLUMNS``, vehicle frame)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "missing file")
    size = path.stat().st_size
    if size % LIDAR_POINT_BYTES:
        raise DatasetError(path, f"size {size} bytes is not a multiple of {LIDAR_POINT_BYTES} "
                           f"(14 float32 columns); the file is truncated or not in this format")
    pts = np.fromfile(path, dtype=np.float32).reshape(-1, LIDAR_NUM_COLUMNS)
    if not np.all(np.isfinite(pts[:, :6])):
        raise DatasetError(path, "LiDAR origins or points contain NaN or Inf")
    return pts


def normalised_intensity(points: np.ndarray) -> np.ndarray:
    """LiDAR intensity [N] in 0-1 from a sweep [N, 14]: files hold 0-1 (Waymo, after tanh) or 0-255
    (nuScenes, KITTI); a sweep whose maximum exceeds 1 is taken as 0-255. NaN/negative -> 0."""
    i = np.nan_to_num(points[:, LIDAR_COLUMNS.index("intensity")].astype(np.float32), nan=0.0, posinf=0.0)
    if i.size and i.max() > 1.0:
        i = i / 255.0
    return np.clip(i, 0.0, 1.0)


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None,
               expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an RGB image as uint8 [H, W, 3], resized (box filter) to ``size`` = (W, H) if given.

    ``expect_size`` = (W, H) is the size the file must have (its camera's, which the intrinsics
    describe); resizing a mismatched image silently would break its calibration.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "missing file")
    try:
        with Image.open(path) as im:
            if expect_size is not None and im.size != tuple(expect_size):
                raise DatasetError(path, f"image size {im.size[0]}x{im.size[1]} differs from its camera's "
                                   f"{expect_size[0]}x{expect_size[1]}", "every image of a camera needs one size")
            im = im.convert("RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.BOX)
            return np.asarray(im)
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"unreadable image ({e})") from None


def read_image_size(path: str | os.PathLike, decode: bool = True) -> tuple[int, int]:
    """(W, H) of an image; with ``decode`` the pixels are decoded too (catches truncation)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            return im.size
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"unreadable image ({e})") from None


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask PNG as bool [H, W] (pixel > 127), resized (nearest) to ``size`` = (W, H)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "missing file")
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.NEAREST)
            return np.asarray(im) > 127
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"unreadable mask ({e})") from None


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(path, f"unreadable JSON ({e})") from None


# ----------------------------------------------------------------------------- writers


def write_matrix4(path: str | os.PathLike, M: np.ndarray) -> None:
    M = np.asarray(M, dtype=np.float64).reshape(4, 4)
    _write_text(path, "\n".join(" ".join(f"{v:.17g}" for v in row) for row in M) + "\n")


def write_intrinsics(path: str | os.PathLike, values: np.ndarray) -> None:
    values = np.asarray(values, dtype=np.float64).reshape(9)
    _write_text(path, "\n".join(f"{v:.17g}" for v in values) + "\n")


def write_lidar(path: str | os.PathLike, points: np.ndarray) -> None:
    points = np.ascontiguousarray(points, dtype=np.float32)
    assert points.ndim == 2 and points.shape[1] == LIDAR_NUM_COLUMNS, points.shape
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    points.tofile(path)


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Write uint8 [H, W, 3] as JPEG (or PNG by extension)."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path, quality=quality)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(np.asarray(mask), 255, 0).astype(np.uint8)).save(path)


def write_instance_mask(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Write [H, W] integer instance ids (0 = none, k + 1 = instance k) as a 16-bit PNG."""
    from PIL import Image

    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 65535:
        raise ValueError(f"instance mask values must be in 0..65535, got {ids.min()}..{ids.max()}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint16)).save(path)


def read_instance_mask(path: str | os.PathLike) -> np.ndarray:
    """[H, W] int32 instance ids of a mask written by :func:`write_instance_mask`."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "missing file")
    try:
        with Image.open(path) as im:
            return np.asarray(im).astype(np.int32)
    except OSError as e:
        raise DatasetError(path, f"unreadable instance mask ({e})") from e


def write_json(path: str | os.PathLike, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=1))


def _write_text(path: str | os.PathLike, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


# ----------------------------------------------------------------------------- paths


@dataclass
class SceneLayout:
    """Paths and indices of one scene folder. Build with :meth:`scan` (validates the structure)."""

    root: Path
    frames: list[int]
    cameras: list[int]
    image_ext: dict[tuple[int, int], str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.root.name

    def image_path(self, t: int, cam: int) -> Path:
        return self.root / "images" / f"{t:03d}_{cam}{self.image_ext.get((t, cam), '.jpg')}"

    def intrinsics_path(self, cam: int) -> Path:
        return self.root / "intrinsics" / f"{cam}.txt"

    def extrinsics_path(self, cam: int) -> Path:
        return self.root / "extrinsics" / f"{cam}.txt"

    def ego_pose_path(self, t: int) -> Path:
        return self.root / "ego_pose" / f"{t:03d}.txt"

    def lidar_path(self, t: int) -> Path:
        return self.root / "lidar" / f"{t:03d}.bin"

    def sky_mask_path(self, t: int, cam: int) -> Path:
        return self.root / "sky_masks" / f"{t:03d}_{cam}.png"

    def dynamic_mask_path(self, t: int, cam: int, kind: str = "all") -> Path:
        return self.root / "dynamic_masks" / kind / f"{t:03d}_{cam}.png"

    def depth_path(self, t: int, cam: int) -> Path:
        return self.root / "depth" / f"{t:03d}_{cam}.npy"

    def flow_path(self, t: int, cam: int) -> Path:
        return self.root / "flow" / f"{t:03d}_{cam}.npy"

    @property
    def instances_info_path(self) -> Path:
        return self.root / "instances" / "instances_info.json"

    @property
    def frame_instances_path(self) -> Path:
        return self.root / "instances" / "frame_instances.json"

    def instance_mask_path(self, t: int, cam: int) -> Path:
        return self.root / "instance_masks" / f"{t:03d}_{cam}.png"

    @property
    def true_instances_info_path(self) -> Path:
        return self.root / "instances_gt" / "instances_info.json"

    def has(self, modality: str) -> bool:
        """Whether an optional modality is present: lidar, sky_masks, dynamic_masks, instances,
        instance_masks, depth, flow."""
        t, c = self.frames[0], self.cameras[0]
        probe = {
            "lidar": self.lidar_path(t),
            "sky_masks": self.sky_mask_path(t, c),
            "dynamic_masks": self.dynamic_mask_path(t, c),
            "instances": self.instances_info_path,
            "instance_masks": self.instance_mask_path(t, c),
            "depth": self.depth_path(t, c),
            "flow": self.flow_path(t, c),
        }[modality]
        return probe.is_file()

    @classmethod
    def scan(cls, root: str | os.PathLike) -> "SceneLayout":
        """Index a scene folder from its ``images/``; checks every frame has the same cameras."""
        root = Path(root)
        img_dir = root / "images"
        if not img_dir.is_dir():
            raise DatasetError(img_dir, "missing images/ folder",
                               "a scene folder must hold images/{t:03d}_{cam}.jpg")
        per_frame: dict[int, set[int]] = {}
        ext: dict[tuple[int, int], str] = {}
        for name in os.listdir(img_dir):
            m = _IMAGE_RE.match(name)
            if not m:
                continue
            t, c = int(m.group(1)), int(m.group(2))
            per_frame.setdefault(t, set()).add(c)
            ext[(t, c)] = "." + m.group(3)
        if not per_frame:
            raise DatasetError(img_dir, "no images named {t:03d}_{cam}.jpg")
        frames = sorted(per_frame)
        cams = sorted(per_frame[frames[0]])
        for t in frames:
            if sorted(per_frame[t]) != cams:
                raise DatasetError(
                    img_dir, f"camera ids differ between frames: frame {frames[0]} has {cams}, "
                    f"frame {t} has {sorted(per_frame[t])}", "every frame needs the same cameras")
        layout = cls(root=root, frames=frames, cameras=cams, image_ext=ext)
        layout.camera_names()  # a broken cameras.json fails here, naming the file
        return layout

    @property
    def cameras_file(self) -> Path:
        return self.root / CAMERAS_FILE

    def camera_names(self) -> dict[int, str]:
        """Camera id -> name for this scene's cameras.

        From ``cameras.json`` when present (its ``"names"`` win over its ``"dataset"`` rig); else
        Waymo's names when every id is <= 4 (the drivestudio-Waymo layout), else ``CAM_{id}``.
        """
        if self.cameras_file.is_file():
            return read_camera_names(self.cameras_file, self.cameras)
        if all(c in CAMERA_NAMES for c in self.cameras):
            return {c: CAMERA_NAMES[c] for c in self.cameras}
        return {c: generic_camera_name(c) for c in self.cameras}


def generic_camera_name(cam: int) -> str:
    return f"CAM_{cam}"


def read_camera_names(path: str | os.PathLike, cameras: list[int]) -> dict[int, str]:
    """Names of ``cameras`` from a ``cameras.json`` (format in docs/data_formats.md)."""
    path = Path(path)
    spec = read_json(path)
    if not isinstance(spec, dict) or not set(spec) <= {"dataset", "names"}:
        raise DatasetError(path, "expected a JSON object with keys 'dataset' and/or 'names'",
                           'e.g. {"dataset": "nuscenes"} or {"names": {"0": "FRONT", "5": "BACK"}}')
    names: dict[int, str] = {}
    if "dataset" in spec:
        rig = CAMERA_RIGS.get(str(spec["dataset"]).lower())
        if rig is None:
            raise DatasetError(path, f"unknown dataset {spec['dataset']!r}",
                               f"use one of {sorted(CAMERA_RIGS)} or give 'names'")
        names.update(enumerate(rig))
    explicit = spec.get("names", {})
    if not isinstance(explicit, dict) or not all(str(k).isdigit() for k in explicit):
        raise DatasetError(path, "'names' must map camera ids (\"0\", \"1\", ...) to names")
    names.update({int(k): str(v) for k, v in explicit.items()})
    return {c: names.get(c, generic_camera_name(c)) for c in cameras}


def find_scenes(data: str | os.PathLike) -> list[Path]:
    """Scene folders under ``data``: ``data`` itself if it holds images/, else its sub-folders that do.

    Sub-folders are sorted numerically when their names are numbers (drivestudio's 000, 001, ...).
    """
    data = Path(data)
    if not data.is_dir():
        raise DatasetError(data, "data folder does not exist", "pass --data DIR (a scene folder or a folder "
                           "of scene folders); bash scripts/demo.sh writes a synthetic one under outputs/demo/")
    if (data / "images").is_dir():
        return [data]
    scenes = [p for p in data.iterdir() if p.is_dir() and (p / "images").is_dir()]
    if not scenes:
        raise DatasetError(data, "no scene folders found (expected sub-folders with images/, "
                           "e.g. processed/training/000/images)")
    return sorted(scenes, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
