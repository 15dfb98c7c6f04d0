"""Coordinate frames and small rigid-transform helpers.

Frames used across evolsplat-ns (see docs/architecture.md):

- **Waymo camera axes** (drivestudio ``extrinsics/{cam}.txt``): x forward, y left, z up.
- **OpenCV camera axes**: x right, y down, z forward (looking direction). Every camera-to-world
  matrix inside evolsplat-ns is OpenCV unless a name says otherwise.
- **OpenGL / nerfstudio camera axes**: x right, y up, z backward. Only used at the nerfstudio
  ``Cameras`` boundary (viewer, ns-eval), converted by :func:`opencv_to_opengl`.
- **Vehicle frame** (Waymo): x forward, y left, z up, origin at the rear axle on the ground.
- **World** (drivestudio ``ego_pose``): Waymo's global ENU frame, vehicle-to-world per frame.
- **Segment frame**: the vehicle frame at the first frame of a segment. All tensors a
  ``MultiSceneDataset`` sample carries are in this frame (keeps coordinates small for fp16/voxels).
"""

from __future__ import annotations

import numpy as np
import torch

# Waymo camera axes (x fwd, y left, z up) <- OpenCV camera axes (x right, y down, z fwd).
# OpenCV camera-to-vehicle = extrinsic_waymo @ OPENCV2DATASET.
OPENCV2DATASET = np.array(
    [[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)
# OpenCV camera axes -> OpenGL camera axes (flip y and z); self-inverse.
OPENCV2OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def is_rigid(T: np.ndarray, atol: float = 1e-3) -> bool:
    """True if ``T`` [4, 4] is finite, has last row [0,0,0,1] and an orthonormal rotation, det +1."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return False
    R = T[:3, :3]
    return (
        np.allclose(T[3], [0, 0, 0, 1], atol=atol)
        and np.allclose(R @ R.T, np.eye(3), atol=atol)
        and abs(np.linalg.det(R) - 1.0) < atol
    )


def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``T`` [..., 4, 4] without a general matrix inverse."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def opencv_to_opengl(c2w: torch.Tensor) -> torch.Tensor:
    """OpenCV camera-to-world [..., 4, 4] -> OpenGL (nerfstudio) camera-to-world, same world."""
    flip = torch.tensor(OPENCV2OPENGL, dtype=c2w.dtype, device=c2w.device)
    return c2w @ flip


def opengl_to_opencv(c2w: torch.Tensor) -> torch.Tensor:
    """OpenGL (nerfstudio) camera-to-world [..., 4, 4] -> OpenCV camera-to-world, same world."""
    return opencv_to_opengl(c2w)


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pinhole matrix K [3, 3] in pixels (OpenCV convention, pixel centres at +0.5)."""
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)


def project_points(
    points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into OpenCV cameras.

    Args:
        points: [N, 3] in the world (or segment) frame.
        K: [C, 3, 3] pixel intrinsics.
        w2c: [C, 4, 4] world-to-camera, OpenCV axes.
    Returns:
        uv: [C, N, 2] pixel coordinates (x right, y down); depth: [C, N] camera z (metres).
    """
    cam = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]
    depth = cam[..., 2]
    pix = cam @ K.transpose(-1, -2)
    uv = pix[..., :2] / depth.clamp(min=1e-6)[..., None]
    return uv, depth
