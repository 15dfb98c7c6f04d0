"""Camera conventions shared by every layer: the reference-camera rule and the one place where
evolsplat ``Views`` (OpenCV) meet nerfstudio ``Cameras`` (OpenGL).

Frames: ``Views.camtoworlds`` are OpenCV camera-to-segment (x right, y down, z forward); nerfstudio
``Cameras.camera_to_worlds`` are OpenGL camera-to-segment (x right, y up, z backward). The segment
frame itself is the same on both sides; only the camera axes flip (``geometry.opencv_to_opengl``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType

from evolsplat_ns.data.types import Views
from evolsplat_ns.geometry import opencv_to_opengl, opengl_to_opencv

FRONT_CAMERA = 0
"""Camera id of the forward-facing camera (drivestudio/Waymo order)."""


def front_camera(camera_ids: Sequence[int]) -> int:
    """The FRONT camera (id 0) if among ``camera_ids``, else the lowest id."""
    return FRONT_CAMERA if FRONT_CAMERA in camera_ids else min(camera_ids)


def reference_view(views: Views) -> int:
    """Index in ``views`` of the first view of the :func:`front_camera` (export, snapshots)."""
    ids = views.cam_ids.tolist()
    return ids.index(front_camera(ids))


def poses_to_cameras(camtoworlds: torch.Tensor, intrinsics: torch.Tensor, width: int, height: int,
                     metadata: dict | None = None) -> Cameras:
    """nerfstudio Cameras [V] from OpenCV camera-to-frame poses [V, 4, 4] and pinhole K [V, 3, 3]
    (pixels of ``width`` x ``height`` images); the result holds OpenGL camera-to-frame poses."""
    c2w = opencv_to_opengl(camtoworlds)[:, :3, :4]
    K = intrinsics
    n = len(camtoworlds)
    return Cameras(
        camera_to_worlds=c2w, fx=K[:, 0, 0:1], fy=K[:, 1, 1:2], cx=K[:, 0, 2:3], cy=K[:, 1, 2:3],
        width=torch.full((n, 1), width, dtype=torch.long), height=torch.full((n, 1), height, dtype=torch.long),
        camera_type=CameraType.PERSPECTIVE, metadata=metadata,
    )


def views_to_cameras(views: Views, metadata: dict | None = None) -> Cameras:
    """nerfstudio Cameras [V] for ``views``: OpenGL camera-to-world in the views' (segment) frame."""
    return poses_to_cameras(views.camtoworlds, views.intrinsics, views.width, views.height, metadata)


def camera_to_opencv(camera: Cameras, device: Optional[torch.device | str] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A single nerfstudio camera -> (OpenCV camera-to-world [4, 4], K [3, 3], W, H), the tensors on
    ``device`` (default: the camera's).

    The fields are read in one copy to the host (W and H are needed there): from a GPU camera one
    device sync, where ``camera.to("cpu")`` costs one per field (about ten in a viewer frame).
    """
    c = camera
    first = [t.reshape(-1)[:1].to(torch.float64) for t in (c.fx, c.fy, c.cx, c.cy, c.width, c.height)]
    host = torch.cat([c.camera_to_worlds.reshape(-1, 12)[0].to(torch.float64)] + first).cpu()
    c2w = torch.eye(4)
    c2w[:3, :4] = host[:12].view(3, 4)
    K = torch.eye(3)
    K[[0, 1, 0, 1], [0, 1, 2, 2]] = host[12:16].float()
    device = c.camera_to_worlds.device if device is None else torch.device(device)
    return (opengl_to_opencv(c2w).to(device, non_blocking=True), K.to(device, non_blocking=True),
            int(host[16]), int(host[17]))
