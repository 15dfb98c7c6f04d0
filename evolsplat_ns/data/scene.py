"""One scene on disk: calibration, poses and per-frame loaders in any reference frame.

``SceneData`` reads a drivestudio scene folder once (validated through :mod:`layout`) and loads
images, masks, depth and LiDAR on demand. Poses it returns are OpenCV camera-to-``ref`` where
``ref_from_world`` is given by the caller (the segment frame for a ``MultiSceneDataset`` sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.types import LidarSweep, Views
from evolsplat_ns.geometry import OPENCV2DATASET


@dataclass
class CameraCalib:
    """Calibration of one camera: ``K``, ``width`` and ``height`` after downscaling.

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
        downscale: images load at ``round(W / downscale) x round(H / downscale)``; K scales to match.
        cameras: camera ids to use (default: all present).
    """

    def __init__(self, root: str | Path, downscale: float = 1.0, cameras: Sequence[int] | None = None):
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
        self.cameras = cams
        self.frames = self.layout.frames
        self.calib = {c: self._read_calib(c) for c in cams}
        self.ego_to_world = {t: L.read_matrix4(self.layout.ego_pose_path(t)) for t in self.frames}

    def _read_calib(self, cam: int) -> CameraCalib:
        intr = L.read_intrinsics(self.layout.intrinsics_path(cam))
        ext = L.read_matrix4(self.layout.extrinsics_path(cam))
        W, H = L.read_image_size(self.layout.image_path(self.frames[0], cam), decode=False)
        w, h = max(1, round(W / self.downscale)), max(1, round(H / self.downscale))
        sx, sy = w / W, h / H
        K = np.array([[intr[0] * sx, 0, intr[2] * sx], [0, intr[1] * sy, intr[3] * sy], [0, 0, 1]])
        return CameraCalib(K=K, distortion=intr[4:], cam_to_vehicle=ext @ OPENCV2DATASET, width=w, height=h,
                           full_size=(W, H))

    def image_size(self, cam: int) -> tuple[int, int]:
        """(W, H) after downscaling."""
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
    ) -> Views:
        """Views of ``frames`` x ``cameras`` (frame-major), poses OpenCV camera-to-ref.

        All cameras must share one image size after downscaling (else a DatasetError says so).
        """
        cams = list(cameras) if cameras is not None else self.cameras
        sizes = {self.image_size(c) for c in cams}
        if len(sizes) > 1:
            raise L.DatasetError(self.layout.root / "images", f"cameras {cams} have different image "
                                 f"sizes {sorted(sizes)}", "select cameras of one size (e.g. 0,1,2)")
        size = sizes.pop()
        pairs = [(t, c) for t in frames for c in cams]
        imgs = np.stack([L.read_image(self.layout.image_path(t, c), size, self.calib[c].full_size)
                         for t, c in pairs])
        c2w = np.stack([ref_from_world @ self.cam_to_world(t, c) for t, c in pairs])
        Ks = np.stack([self.calib[c].K for _, c in pairs])
        views = Views(
            images=torch.from_numpy(imgs).float().div_(255.0),
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

    def load_lidar(self, frames: Sequence[int], ref_from_world: np.ndarray) -> LidarSweep:
        """LiDAR points of ``frames``, moved from the vehicle frame to ``ref``."""
        pts, fids = [], []
        for t in frames:
            raw = L.read_lidar(self.layout.lidar_path(t))
            T = ref_from_world @ self.ego_to_world[t]
            pts.append(raw[:, 3:6] @ T[:3, :3].T + T[:3, 3])
            fids.append(np.full(len(raw), t))
        return LidarSweep(
            points=torch.from_numpy(np.concatenate(pts)).float(),
            frame_ids=torch.from_numpy(np.concatenate(fids)).long(),
        )

    def instances(self) -> dict:
        """``instances_info.json`` (empty dict when absent)."""
        p = self.layout.instances_info_path
        return L.read_json(p) if p.is_file() else {}
