"""Image-based features for Gaussians: project points into source views and sample colour windows.

Frames and conventions:
- points are in the **segment frame**; ``Views.camtoworlds`` are **OpenCV camera-to-segment**
  (x right, y down, z forward).
- pixel coordinates ``(u, v)`` are continuous with pixel ``(i, j)`` covering ``[i, i+1) x [j, j+1)``,
  i.e. its centre at ``(i + 0.5, j + 0.5)`` (the project's convention, see
  :func:`evolsplat_ns.geometry.intrinsics_matrix`; gsplat uses the same). That is exactly
  ``grid_sample(align_corners=False)``'s convention, so ``u`` maps to ``2u / W - 1``.

Occlusion cue: the point's depth in the source camera minus the depth of the surface that camera
sees at that pixel (>= 0 when the point is hidden behind something, ~0 when it is the visible
surface). The surface depth comes from ``Views.depths`` when present (nearest-pixel lookup; 0 =
unknown gives a cue of 0), otherwise from a z-buffer splat of the points themselves into a depth map
``zbuffer_downscale`` times smaller than the image (coarse so that sparse points still cover it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from evolsplat_ns.data.types import Views
from evolsplat_ns.geometry import invert_rigid, project_points
from evolsplat_ns.model.precision import full_precision


@dataclass
class ProjectedFeatures:
    """Per-Gaussian samples from S source views.

    Attributes:
        colors: [M, S, P, 3] RGB of the (2r+1)^2 = P pixel window around each projection (row-major,
            dy outer, dx inner); window pixels past the border repeat the edge pixel.
        occlusion: [M, S, 1] projected depth minus the source's surface depth (metres, 0 if invalid).
        valid: [M, S] bool, projection centre inside the image and in front of the camera.
        keep: [M] bool, seen by at least ``min_views`` of these S views.
    """

    colors: torch.Tensor
    occlusion: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor

    def select_views(self, idx: torch.Tensor, min_views: int) -> "ProjectedFeatures":
        """The same features restricted to source views ``idx`` [S'], ``keep`` recomputed."""
        valid = self.valid[:, idx]
        return replace(
            self,
            colors=self.colors[:, idx],
            occlusion=self.occlusion[:, idx],
            valid=valid,
            keep=valid.sum(dim=1) >= min_views,
        )


def window_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """[(2r+1)^2, 2] integer pixel offsets (du, dv), dv outer, du inner."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dv, du = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([du.reshape(-1), dv.reshape(-1)], dim=-1)


def to_grid(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coordinates [..., 2] (centres at +0.5) -> grid_sample coordinates (align_corners=False)."""
    # Python scalars per axis, no tensor of the two factors: its host-to-device copy would sync the
    # stream (blocking) or break a CUDA-graph capture (non-blocking from pageable memory).
    return torch.stack((uv[..., 0] * (2.0 / width), uv[..., 1] * (2.0 / height)), dim=-1) - 1.0


def zbuffer_depth(
    uv: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, hw: tuple[int, int], downscale: int
) -> torch.Tensor:
    """Nearest point depth at each point's own cell of a coarse z-buffer of the points themselves.

    Args:
        uv: [V, M, 2] pixel coordinates; depth: [V, M] camera z; valid: [V, M] bool.
        hw: image (H, W); downscale: z-buffer cell size in pixels.
    Returns:
        [V, M] the smallest valid depth in the cell each point falls in (its own depth or less).
    """
    n_views = uv.shape[0]
    h, w = -(-hw[0] // downscale), -(-hw[1] // downscale)
    cell = (uv / downscale).floor().long()
    cx, cy = cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)
    view = torch.arange(n_views, device=uv.device)[:, None]
    flat = (view * h + cy) * w + cx
    # Invalid points go to one extra cell past the end instead of being masked out: a boolean
    # mask would need the count of valid points on the host (a device sync).
    trash = n_views * h * w
    zbuf = torch.full((trash + 1,), float("inf"), device=uv.device, dtype=depth.dtype)
    zbuf.scatter_reduce_(0, torch.where(valid, flat, trash).reshape(-1), depth.reshape(-1), reduce="amin")
    return zbuf[flat]


class Projector:
    """Samples source-view colour windows and occlusion cues for 3D points (no learnable state).

    Args:
        local_radius: r, windows are (2r+1) x (2r+1) pixels.
        num_neighbour_select: how many source views :meth:`select_views` picks for a target.
        min_views: a Gaussian needs at least this many valid source views to be kept.
        zbuffer_downscale: cell size (pixels) of the point z-buffer used when views carry no depth.
    """

    def __init__(
        self,
        local_radius: int = 1,
        num_neighbour_select: int = 4,
        min_views: int = 1,
        zbuffer_downscale: int = 4,
    ) -> None:
        if local_radius < 0 or num_neighbour_select < 1 or min_views < 1:
            raise ValueError("Projector needs local_radius >= 0, num_neighbour_select >= 1, min_views >= 1")
        self.local_radius = local_radius
        self.num_neighbour_select = num_neighbour_select
        self.min_views = min_views
        self.zbuffer_downscale = zbuffer_downscale

    @property
    def window_size(self) -> int:
        return (2 * self.local_radius + 1) ** 2

    def select_views(self, target_c2w: torch.Tensor, source_c2w: torch.Tensor) -> torch.Tensor:
        """Indices [S] of the sources nearest to the target camera, nearest first.

        Ranked by camera-centre distance (to 0.1 mm), ties broken by the angle between the OpenCV
        viewing axes (+z). Both poses are OpenCV camera-to-segment: ``target_c2w`` [4, 4],
        ``source_c2w`` [V, 4, 4]. S = min(num_neighbour_select, V).
        """
        dist = (source_c2w[:, :3, 3] - target_c2w[:3, 3]).norm(dim=-1)
        cos = (source_c2w[:, :3, 2] * target_c2w[:3, 2]).sum(dim=-1).clamp(-1.0, 1.0)
        by_angle = torch.argsort(torch.acos(cos), stable=True)
        by_dist = torch.argsort(torch.round(dist[by_angle] * 1e4), stable=True)
        return by_angle[by_dist][: self.num_neighbour_select]

    def __call__(
        self, points: torch.Tensor, source: Views, target_c2w: torch.Tensor | None = None
    ) -> ProjectedFeatures:
        """Features of ``points`` [M, 3] (segment frame) in the source views (all of them, or the
        nearest ``num_neighbour_select`` to ``target_c2w`` [4, 4] OpenCV camera-to-segment)."""
        if target_c2w is not None:
            source = source.select(self.select_views(target_c2w, source.camtoworlds))
        return self.sample(points, source)

    @torch.no_grad()
    def sample(self, points: torch.Tensor, views: Views) -> ProjectedFeatures:
        """Window colours, occlusion cue and validity of ``points`` [M, 3] (the same in every view)
        or [V, M, 3] (per view: moving actors placed at each view's time) in every view of ``views``.

        No gradient flows to ``points``: image features describe the anchor, its motion is learned
        through the rendered means.
        """
        with full_precision(points.device):  # pixel coordinates need fp32 (see model.precision)
            return self._sample(points.detach(), views)

    def _sample(self, points: torch.Tensor, views: Views) -> ProjectedFeatures:
        height, width = views.height, views.width
        uv, depth = project_points(points, views.intrinsics, invert_rigid(views.camtoworlds))
        in_x = (uv[..., 0] >= 0) & (uv[..., 0] < width)
        valid = (depth > 0) & in_x & (uv[..., 1] >= 0) & (uv[..., 1] < height)
        colors = self._sample_windows(views.images, uv)
        occlusion = torch.where(valid, depth - self._surface_depth(views, uv, depth, valid), 0.0)
        valid_t = valid.T
        return ProjectedFeatures(
            colors=colors,
            occlusion=occlusion.T[..., None],
            valid=valid_t,
            keep=valid_t.sum(dim=1) >= self.min_views,
        )

    def _sample_windows(self, images: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """images [V, H, W, 3], uv [V, M, 2] -> window colours [M, V, P, 3]."""
        height, width = images.shape[1:3]
        window = uv[:, :, None, :] + window_offsets(self.local_radius, uv.device)  # [V, M, P, 2]
        sampled = F.grid_sample(
            images.permute(0, 3, 1, 2),
            to_grid(window, height, width),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )  # [V, 3, M, P]
        return sampled.permute(2, 0, 3, 1)

    def _surface_depth(
        self, views: Views, uv: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """[V, M] depth of the surface each source sees at the points' projections (see module doc)."""
        if views.depths is None:
            return zbuffer_depth(uv, depth, valid, (views.height, views.width), self.zbuffer_downscale)
        surface = F.grid_sample(
            views.depths[:, None],
            to_grid(uv[:, :, None, :], views.height, views.width),
            mode="nearest",
            padding_mode="border",
            align_corners=False,
        )[:, 0, :, 0]
        # Unknown depth (0) must not read as "occluded by something at 0 m".
        return torch.where(surface > 0, surface, depth)
