"""Conversions between evolsplat ``Views`` (OpenCV) and nerfstudio ``Cameras`` (OpenGL)."""

from __future__ import annotations

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType

from evolsplat_ns.data.types import Views
from evolsplat_ns.geometry import opencv_to_opengl


def views_to_cameras(views: Views, metadata: dict | None = None) -> Cameras:
    """nerfstudio Cameras [V] for ``views``: OpenGL camera-to-world in the views' (segment) frame."""
    c2w = opencv_to_opengl(views.camtoworlds)[:, :3, :4]
    K = views.intrinsics
    return Cameras(
        camera_to_worlds=c2w, fx=K[:, 0, 0:1], fy=K[:, 1, 1:2], cx=K[:, 0, 2:3], cy=K[:, 1, 2:3],
        width=torch.full((len(views), 1), views.width, dtype=torch.long),
        height=torch.full((len(views), 1), views.height, dtype=torch.long),
        camera_type=CameraType.PERSPECTIVE, metadata=metadata,
    )
