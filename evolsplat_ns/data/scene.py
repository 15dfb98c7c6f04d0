"""One scene on disk: calibration, poses and per-frame loaders in any reference frame.

``SceneData`` reads a drivestudio scene folder once (validated through :mod:`layout`) and loads
images, masks, depth and LiDAR on demand. Poses it returns are OpenCV camera-to-``ref`` where
``ref_from_world`` is given by the caller (the segment frame for a ``MultiSceneDataset`` sample).

Image size. A batch of views (``Views``) holds one image size, so every camera of a scene loads
at one **common size**: the first selected camera's size after ``downscale`` (or ``image_size``
when given). A camera of another size (Waymo's side cameras, Argoverse 2's portrait ring cameras)
is resized to it and its K scaled per axis (``fu * w / W``, ``fv * h / H``), which keeps the
pinhole projection exact (pixels may become non-square). Select cameras of one shape to avoid
anisotropic resampling.

Timing. A frame's images, LiDAR sweep and ego pose are taken as simultaneous (drivestudio pairs
them per frame index). Cameras that fire some milliseconds apart (rolling shutters, unsynchronised
rigs) are not compensated: at 10 m/s a 10 ms offset is 0.1 m of ego motion.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.cache import ImageCache
from evolsplat_ns.data.types import LidarSweep, Views, rgb_float
from evolsplat_ns.geometry import OPENCV2DATASET

MIN_LIDAR_RANGE = 0.05
"""Metres: a LiDAR point this close to its origin is an invalid return (zero-length ray)."""


@functools.lru_cache(maxsize=1)
def _decode_pool() -> ThreadPoolExecutor:
    """Threads decoding a sample's JPEGs in parallel: PIL releases the GIL while it decodes, and
    one thread decoding 7 images of 960x640 (~40 ms) would otherwise bound training at ~25 it/s."""
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="image-decode")


@dataclass
class CameraCalib:
    """Calibration of one camera: ``K``, ``width`` and ``height`` after resizing to the scene's
    common size (see the module docstring).

    ``cam_to_vehicle`` [4, 4] maps **OpenCV** camera axes to the vehicle frame (the file's Waymo-axes
    extrinsic times OPENCV2DATASET). ``distortion`` (k1 k2 p1 p2 k3) is kept but not applied.
    """

    K: np.ndarray
    distortion: np.ndarray
    cam_to_vehicle: np.ndarray
    width: int
    height: int
    full_size: tuple[int, int]
    """(W, H) of the image files, before downscaling."""


class SceneData:
    """A drivestudio scene folder, indexed and calibrated.

    Args:
        root: the scene folder.
        downscale: images load at ``round(W / downscale) x round(H / downscale)`` of the first
            selected camera's size ``W x H``; K scales to match.
        cameras: camera ids to use (default: all present).
        image_size: (W, H) every camera loads at, overriding ``downscale`` (None = from it).
    """

    def __init__(self, root: str | Path, downscale: float = 1.0, cameras: Sequence[int] | None = None,
                 image_size: tuple[int, int] | None = None):
        self.layout = L.SceneLayout.scan(root)
        self.name = self.layout.name
        self.downscale = float(downscale)
        if downscale <= 0:
            raise ValueError(f"downscale must be > 0, got {downscale}")
        cams = list(cameras) if cameras is not None else self.layout.cameras
        missing = [c for c in cams if c not in self.layout.cameras]
        if missing:
            raise L.DatasetError(self.layout.root / "images", f"cameras {missing} requested but the "
                                 f"scene has only {self.layout.cameras}", "fix the cameras setting")
        if not cams:
            raise L.DatasetError(self.layout.root / "images", "no cameras selected", "fix the cameras setting")
        self.cameras = cams
        self.camera_names = {c: n for c, n in self.layout.camera_names().items() if c in cams}
        self.frames = self.layout.frames
        full = {c: L.read_image_size(self.layout.image_path(self.frames[0], c), decode=False) for c in cams}
        if image_size is None:
            W0, H0 = full[cams[0]]
            image_size = (max(1, round(W0 / self.downscale)), max(1, round(H0 / self.downscale)))
        self.common_size = (int(image_size[0]), int(image_size[1]))
        self.calib = {c: self._read_calib(c, full[c]) for c in cams}
        self.ego_to_world = {t: L.read_matrix4(self.layout.ego_pose_path(t)) for t in self.frames}
        self.image_cache: Optional[ImageCache] = None
        """Decoded images shared with other scenes (its owner, e.g. ``MultiSceneDataset``, sets
        it); None decodes every load."""

    def _read_calib(self, cam: int, full_size: tuple[int, int]) -> CameraCalib:
        intr = L.read_intrinsics(self.layout.intrinsics_path(cam))
        ext = L.read_matrix4(self.layout.extrinsics_path(cam))
        (W, H), (w, h) = full_size, self.common_size
        sx, sy = w / W, h / H
        K = np.array([[intr[0] * sx, 0, intr[2] * sx], [0, intr[1] * sy, intr[3] * sy], [0, 0, 1]])
        return CameraCalib(K=K, distortion=intr[4:], cam_to_vehicle=ext @ OPENCV2DATASET, width=w, height=h,
                           full_size=(W, H))

    def subset(self, cameras: Sequence[int]) -> "SceneData":
        """The same scene restricted to ``cameras`` (shares calibration and poses; nothing re-read)."""
        missing = [c for c in cameras if c not in self.cameras]
        if missing or not cameras:
            raise ValueError(f"scene {self.name}: cannot restrict to cameras {list(cameras)} of {self.cameras}")
        out = copy.copy(self)
        out.cameras = list(cameras)
        out.calib = {c: self.calib[c] for c in cameras}
        out.camera_names = {c: self.camera_names[c] for c in cameras}
        return out

    def with_image_size(self, image_size: tuple[int, int]) -> "SceneData":
        """The same scene loading every camera at ``image_size`` = (W, H), K rescaled per axis."""
        w, h = int(image_size[0]), int(image_size[1])
        if w < 1 or h < 1:
            raise ValueError(f"image_size must be positive (W, H), got {tuple(image_size)}")
        out = copy.copy(self)
        out.common_size = (w, h)
        out.calib = {c: replace(k, K=np.diag([w / k.width, h / k.height, 1.0]) @ k.K, width=w, height=h)
                     for c, k in self.calib.items()}
        return out

    def image_size(self, cam: int) -> tuple[int, int]:
        """(W, H) the camera's images load at (the scene's common size)."""
        c = self.calib[cam]
        return c.width, c.height

    def cam_to_world(self, t: int, cam: int) -> np.ndarray:
        """[4, 4] OpenCV camera-to-world at frame ``t``."""
        return self.ego_to_world[t] @ self.calib[cam].cam_to_vehicle

    def load_views(
        self,
        frames: Sequence[int],
        ref_from_world: np.ndarray,
        cameras: Sequence[int] | None = None,
        depth: bool = False,
        sky: bool = False,
        dynamic: bool = False,
        uint8_rgb: bool = False,
    ) -> Views:
        """Views of ``frames`` x ``cameras`` (frame-major), poses OpenCV camera-to-ref, at the
        scene's common image size; images float32 in [0, 1], or as decoded (uint8) with ``uint8_rgb``."""
        cams = list(cameras) if cameras is not None else self.cameras
        return self.load_view_pairs([(t, c) for t in frames for c in cams], ref_from_world,
                                    depth=depth, sky=sky, dynamic=dynamic, uint8_rgb=uint8_rgb)

    def load_view_pairs(
        self,
        pairs: Sequence[tuple[int, int]],
        ref_from_world: np.ndarray,
        depth: bool = False,
        sky: bool = False,
        dynamic: bool = False,
        uint8_rgb: bool = False,
    ) -> Views:
        """Views of the (frame, camera) ``pairs`` in that order; see :meth:`load_views`."""
        pairs = [(int(t), int(c)) for t, c in pairs]
        unknown = sorted({c for _, c in pairs} - set(self.cameras))
        if unknown:
            raise ValueError(f"scene {self.name}: cameras {unknown} are not loaded (cameras: {self.cameras})")
        size = self.common_size
        imgs = np.stack(list(_decode_pool().map(lambda tc: self._read_rgb(*tc, size), pairs)))
        c2w = np.stack([ref_from_world @ self.cam_to_world(t, c) for t, c in pairs])
        Ks = np.stack([self.calib[c].K for _, c in pairs])
        views = Views(
            images=torch.from_numpy(imgs) if uint8_rgb else rgb_float(torch.from_numpy(imgs)),
            intrinsics=torch.from_numpy(Ks).float(),
            camtoworlds=torch.from_numpy(c2w).float(),
            frame_ids=torch.tensor([t for t, _ in pairs]),
            cam_ids=torch.tensor([c for _, c in pairs]),
        )
        if depth and self.layout.has("depth"):
            views.depths = torch.stack([self._load_depth(t, c, size) for t, c in pairs])
        if sky and self.layout.has("sky_masks"):
            views.sky_masks = self._load_masks(pairs, size, self.layout.sky_mask_path)
        if dynamic and self.layout.has("dynamic_masks"):
            views.dynamic_masks = self._load_masks(pairs, size, self.layout.dynamic_mask_path)
        return views

    def _read_rgb(self, t: int, cam: int, size: tuple[int, int]) -> np.ndarray:
        """[H, W, 3] uint8 image of frame ``t``, camera ``cam`` at ``size`` (W, H), decoded or cached."""
        path = self.layout.image_path(t, cam)
        load = lambda: L.read_image(path, size, self.calib[cam].full_size)  # noqa: E731
        cache = getattr(self, "image_cache", None)  # a data source's own subclass may not set it
        return load() if cache is None else cache.get_or_load((str(path), tuple(size)), load)

    def _load_masks(self, pairs, size, path_fn) -> torch.Tensor:
        return torch.from_numpy(np.stack([L.read_mask(path_fn(t, c), size) for t, c in pairs]))

    def _load_depth(self, t: int, cam: int, size: tuple[int, int]) -> torch.Tensor:
        """Depth [H, W] at ``size``; nearest-neighbour resize keeps depth edges unblended."""
        path = self.layout.depth_path(t, cam)
        try:
            d = torch.from_numpy(np.load(path).astype(np.float32))
        except (OSError, ValueError) as e:
            raise L.DatasetError(path, f"unreadable depth map ({e})") from None
        if d.ndim != 2:
            raise L.DatasetError(path, f"depth must be [H, W], got shape {tuple(d.shape)}")
        if tuple(d.shape) != (size[1], size[0]):
            d = torch.nn.functional.interpolate(d[None, None], size=(size[1], size[0]), mode="nearest")[0, 0]
        return d

    def load_flow(self, t: int, cam: int, size: tuple[int, int]) -> torch.Tensor:
        """Ground-truth optical flow t -> t+1 of camera ``cam`` at ``size`` = (W, H): [H, W, 2]
        float32 pixels (dx right, dy down), resized bilinearly with the vectors scaled to match."""
        path = self.layout.flow_path(t, cam)
        try:
            f = torch.from_numpy(np.load(path).astype(np.float32))
        except (OSError, ValueError) as e:
            raise L.DatasetError(path, f"unreadable flow ({e})") from None
        if f.ndim != 3 or f.shape[2] != 2:
            raise L.DatasetError(path, f"flow must be [H, W, 2], got shape {tuple(f.shape)}")
        h, w = f.shape[:2]
        if (w, h) != tuple(size):
            f = torch.nn.functional.interpolate(f.permute(2, 0, 1)[None], size=(size[1], size[0]), mode="bilinear",
                                                align_corners=False)[0].permute(1, 2, 0)
            f = f * torch.tensor([size[0] / w, size[1] / h])
        return f

    def load_lidar(self, frames: Sequence[int], ref_from_world: np.ndarray) -> LidarSweep:
        """LiDAR points of ``frames``, moved from the vehicle frame to ``ref``.

        Sensors as they come: points at their own origin (zero-length rays, < ``MIN_LIDAR_RANGE``)
        are dropped; an all-zero origin column (fused multi-sensor clouds: origin = vehicle origin
        on the ground) is accepted (origins serve only that check). Each case is warned once per
        scene. Intensity is not read (any range works; ``layout.normalised_intensity`` maps 0-1 or
        0-255 to 0-1 for tools that want it).
        """
        pts, fids = [], []
        for t in frames:
            raw = self._clean_sweep(L.read_lidar(self.layout.lidar_path(t)), t)
            T = ref_from_world @ self.ego_to_world[t]
            pts.append(raw[:, 3:6] @ T[:3, :3].T + T[:3, 3])
            fids.append(np.full(len(raw), t))
        return LidarSweep(
            points=torch.from_numpy(np.concatenate(pts)).float(),
            frame_ids=torch.from_numpy(np.concatenate(fids)).long(),
        )

    def _clean_sweep(self, raw: np.ndarray, t: int) -> np.ndarray:
        """Drop zero-length rays; note fused (all-zero) origins. Warns once per scene and case."""
        rng = np.linalg.norm(raw[:, 3:6] - raw[:, 0:3], axis=1)
        short = rng < MIN_LIDAR_RANGE
        if short.any():
            self._warn_once("zero_range", f"{self.layout.lidar_path(t)}: {int(short.sum())} LiDAR point(s) lie "
                            f"within {MIN_LIDAR_RANGE} m of their origin (zero-length rays); dropped")
            raw = raw[~short]
        if len(raw) and not np.any(raw[:, 0:3]):
            self._warn_once("fused", f"{self.layout.lidar_path(t)}: every LiDAR origin is (0, 0, 0) (a fused "
                            "cloud?); accepted, ray lengths are then measured from the vehicle origin")
        return raw

    def _warn_once(self, case: str, message: str) -> None:
        seen = self.__dict__.setdefault("_warned", set())
        if case not in seen:
            seen.add(case)
            warnings.warn(message, stacklevel=3)

    def instances(self) -> dict:
        """``instances_info.json`` (empty dict when absent)."""
        p = self.layout.instances_info_path
        return L.read_json(p) if p.is_file() else {}
