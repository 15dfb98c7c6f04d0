"""Flow + depth aggregation into per-object rigid motion (metres throughout).

For one object between frames t and t+1 of one camera: pixels p of its mask at t with depth, their
flow targets ``q = p + F(p)`` kept if ``q`` falls in its mask at t+1 with depth there; both ends
are lifted into the segment frame (``X_t``, ``X_t1`` [n, 3]) and a weighted Kabsch fit in a few
IRLS rounds with Huber weights (outlier rejection) gives ``ΔT`` with ``X_t1 ≈ ΔT · X_t`` (segment
frame). Weak evidence (too few points, or points on a line) falls back to the box
increment ``T_box(t+1) · T_box(t)⁻¹``.

Pixel convention: pixel (row i, column j) has its centre at (j + 0.5, i + 0.5), as the intrinsics
(OpenCV, see :func:`evolsplat_ns.geometry.intrinsics_matrix`); flow is in pixels, t -> t+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class RigidFit:
    """transform [4, 4] (X_t1 ≈ transform · X_t); inlier_fraction in [0, 1]; points used; ok: the
    fit had enough well-spread evidence (False: ``transform`` is the fallback)."""

    transform: torch.Tensor
    inlier_fraction: float
    points: int
    ok: bool


def weighted_kabsch(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[4, 4] rigid T minimising Σ w ‖R X + t − Y‖² (X, Y [n, 3], w [n] ≥ 0), det(R) = +1."""
    w = w / w.sum().clamp(min=1e-12)
    mx, my = (w[:, None] * X).sum(0), (w[:, None] * Y).sum(0)
    cov = ((X - mx) * w[:, None]).T @ (Y - my)
    U, _, Vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(Vh.T @ U.T))
    D = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    R = Vh.T @ D @ U.T
    T = torch.eye(4, dtype=X.dtype, device=X.device)
    T[:3, :3], T[:3, 3] = R, my - R @ mx
    return T


def robust_rigid_fit(X: torch.Tensor, Y: torch.Tensor, fallback: torch.Tensor, rounds: int = 5,
                     huber_m: float = 0.2, min_points: int = 30, min_spread: float = 1e-3) -> RigidFit:
    """Weighted Kabsch in ``rounds`` IRLS rounds with Huber weights (δ = ``huber_m`` metres), then
    one fit on the inliers (residual ≤ δ).

    Falls back to ``fallback`` [4, 4] with fewer than ``min_points`` correspondences or when the
    points lie on a line (second / largest singular value of the centred points < ``min_spread``;
    a plane is fine: a car side seen by one camera determines the motion).
    """
    n = X.shape[0]
    if n < min_points:
        return RigidFit(fallback, 0.0, n, False)
    X64, Y64 = X.double(), Y.double()
    sv = torch.linalg.svdvals(X64 - X64.mean(0))
    if float(sv[1] / sv[0].clamp(min=1e-12)) < min_spread:
        return RigidFit(fallback, 0.0, n, False)
    w = torch.ones(n, dtype=torch.float64, device=X.device)
    for _ in range(rounds):
        T = weighted_kabsch(X64, Y64, w)
        r = (X64 @ T[:3, :3].T + T[:3, 3] - Y64).norm(dim=-1)
        w = torch.where(r <= huber_m, torch.ones_like(r), huber_m / r.clamp(min=1e-12))
    T = weighted_kabsch(X64, Y64, w)
    r = (X64 @ T[:3, :3].T + T[:3, 3] - Y64).norm(dim=-1)
    inliers = r <= huber_m
    if int(inliers.sum()) >= min_points:  # final fit on the inliers alone (gross outliers out)
        T = weighted_kabsch(X64[inliers], Y64[inliers], w[inliers])
        r = (X64 @ T[:3, :3].T + T[:3, 3] - Y64).norm(dim=-1)
    return RigidFit(T.to(X.dtype), float((r <= huber_m).double().mean()), n, True)


def lift(uv: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """Segment-frame points [n, 3] of pixel coordinates ``uv`` [n, 2] at z-depths ``depth`` [n]
    (OpenCV camera ``K`` [3, 3], camera-to-segment ``c2w`` [4, 4])."""
    ones = torch.ones_like(uv[:, :1])
    rays = torch.cat([uv, ones], -1) @ torch.linalg.inv(K).T
    cam = rays * depth[:, None]
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _sample(image: torch.Tensor, uv: torch.Tensor, mode: str) -> torch.Tensor:
    """Values of ``image`` [H, W] at pixel coordinates ``uv`` [n, 2] (centres at +0.5)."""
    H, W = image.shape
    grid = torch.stack([2 * uv[:, 0] / W - 1, 2 * uv[:, 1] / H - 1], -1)[None, None]
    return F.grid_sample(image[None, None].to(uv.dtype), grid, mode=mode, align_corners=False)[0, 0, 0]


def flow_correspondences(mask_t: torch.Tensor, mask_t1: torch.Tensor, flow: torch.Tensor, depth_t: torch.Tensor,
                         depth_t1: torch.Tensor, K: torch.Tensor, c2w_t: torch.Tensor, c2w_t1: torch.Tensor,
                         valid_flow: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-frame correspondences (X_t, X_t1) [n, 3] of one object between two frames of one
    camera: masks [H, W] bool, flow [H, W, 2] (px, t -> t+1), depths [H, W] (0 = unknown),
    ``valid_flow`` [H, W] bool (e.g. a forward-backward check) or None."""
    keep = mask_t & (depth_t > 0)
    if valid_flow is not None:
        keep = keep & valid_flow
    rows, cols = keep.nonzero(as_tuple=True)
    dtype = flow.dtype if flow.is_floating_point() else torch.float32
    p = torch.stack([cols, rows], -1).to(dtype) + 0.5
    q = p + flow[rows, cols].to(dtype)
    H, W = mask_t.shape
    inside = (q[:, 0] >= 0.5) & (q[:, 0] <= W - 0.5) & (q[:, 1] >= 0.5) & (q[:, 1] <= H - 0.5)
    p, q, rows, cols = p[inside], q[inside], rows[inside], cols[inside]
    # depth at t+1 interpolated from the object's own pixels only: all four neighbours of q must be
    # in its mask with depth, so no background or hole is blended in at its silhouette
    own = (mask_t1 & (depth_t1 > 0)).to(dtype)
    ok = _sample(own, q, "bilinear") > 0.999
    d1 = _sample(depth_t1.to(dtype) * own, q, "bilinear")
    X_t = lift(p[ok], depth_t[rows[ok], cols[ok]].to(dtype), K.to(dtype), c2w_t.to(dtype))
    X_t1 = lift(q[ok], d1[ok], K.to(dtype), c2w_t1.to(dtype))
    return X_t, X_t1


def box_increment(pose_t: torch.Tensor, pose_t1: torch.Tensor) -> torch.Tensor:
    """[4, 4] segment-frame motion ``T(t+1) · T(t)⁻¹`` of a box between two frames."""
    return pose_t1 @ torch.linalg.inv(pose_t)
