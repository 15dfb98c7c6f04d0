"""Sky/background model: a dome of Gaussians around the segment, coloured from the source views.

Frames: the dome lives in the **segment frame** (vehicle frame, z up), centred on the point
cloud's bounding-box centre with a radius ``radius_scale`` times the box's half-diagonal, so it
sits behind every foreground point. It covers elevations from ``min_elevation_deg`` (slightly below
the horizon, where distant buildings/trees meet the sky) up to the zenith. Source cameras are
OpenCV camera-to-segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evolsplat_ns.data.types import Views
from evolsplat_ns.geometry import invert_rigid, project_points
from evolsplat_ns.model.heads import mlp
from evolsplat_ns.model.node import GaussianParams
from evolsplat_ns.model.precision import full_precision
from evolsplat_ns.model.render.sh import num_sh_bases, rgb_to_sh0
from evolsplat_ns.model.projector import to_grid


@dataclass
class SkyDome:
    """Dome Gaussians of one step with their colours from the sources (no grad).

    Attributes:
        means: [B, 3] positions (segment frame).
        dirs: [B, 3] unit directions from the dome centre.
        rgb: [B, 3] colour from the first source view that sees the point (else the nearest seen point's).
        seen: [B] bool, some source view saw the point.
        log_scale: [] isotropic log scale matching the point spacing on the dome (a device
            scalar, so building the dome needs no host sync).
    """

    means: torch.Tensor
    dirs: torch.Tensor
    rgb: torch.Tensor
    seen: torch.Tensor
    log_scale: torch.Tensor


def dome_directions(n: int, min_elevation_deg: float, device: torch.device) -> torch.Tensor:
    """[n, 3] evenly spread unit vectors (z up) with elevation >= ``min_elevation_deg``.

    Fibonacci spiral on the spherical cap: equal z steps give equal areas (Archimedes).
    """
    z0 = math.sin(math.radians(min_elevation_deg))
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    z = z0 + (1.0 - z0) * i / n
    azimuth = i * math.pi * (3.0 - math.sqrt(5.0))
    r = (1.0 - z**2).clamp(min=0).sqrt()
    return torch.stack([r * azimuth.cos(), r * azimuth.sin(), z], dim=-1)


def first_view_colors(points: torch.Tensor, source: Views, sky_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour [B, 3] of ``points`` [B, 3] (segment frame) in the first source view that sees each one
    (on a sky pixel, with ``sky_only`` and sources carrying sky masks), and a mask [B] of points so seen; unseen
    points take the nearest seen point's colour (:func:`fill_unseen`)."""
    uv, depth = project_points(points, source.intrinsics, invert_rigid(source.camtoworlds))
    h, w = source.height, source.width
    valid = (depth > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < w) & (uv[..., 1] >= 0) & (uv[..., 1] < h)
    if sky_only and source.sky_masks is not None:
        # Only sky pixels colour the dome: a facade or tree in front of a dome point would
        # otherwise darken the sky around it.
        ix = uv[..., 0].floor().long().clamp(0, w - 1)
        iy = uv[..., 1].floor().long().clamp(0, h - 1)
        views = torch.arange(uv.shape[0], device=uv.device)[:, None]
        valid &= source.sky_masks.to(uv.device)[views, iy, ix]
    sampled = F.grid_sample(
        source.images.permute(0, 3, 1, 2), to_grid(uv[:, :, None], h, w), align_corners=False
    )[..., 0].permute(0, 2, 1)  # [V, B, 3]
    first = valid.float().argmax(dim=0)  # first True view (0 if none)
    rgb = sampled[first, torch.arange(points.shape[0], device=points.device)]
    seen = valid.any(dim=0)
    return fill_unseen(points, rgb, seen, source), seen


def fill_unseen(points: torch.Tensor, rgb: torch.Tensor, seen: torch.Tensor, source: Views) -> torch.Tensor:
    """``rgb`` [B, 3] with each unseen point (``seen`` [B] False) given the colour of the nearest
    seen point, so the dome above the cameras' view continues the sky at the images' top edge
    (not the images' mean colour, which is grey); the mean source colour when nothing is seen."""
    # Dense [B, B] distances (B ~ 2k: a few MB) instead of indexing the seen points: no host sync.
    dist = torch.cdist(points, points).masked_fill(~seen[None, :], float("inf"))
    filled = torch.where(seen[:, None], rgb, rgb[dist.argmin(dim=1)])
    return torch.where(seen.any(), filled, source.images.reshape(-1, 3).mean(dim=0))


class BackgroundModel(nn.Module):
    """Sky dome Gaussians whose source-view colours and scale are refined by a small MLP.

    Args:
        num_points: dome Gaussians.
        radius_scale: dome radius / half-diagonal of the point cloud's bounding box.
        min_elevation_deg: lowest dome elevation (segment-frame z up).
        hidden: MLP width.
        sh_degree: SH degree of the output (bands above 0 are zero: the sky is view-independent).
        sky_colors: colour the dome from the sources' sky pixels only (when they carry sky masks);
            otherwise from whatever the sources show there (buildings in front included).
    """

    def __init__(
        self,
        num_points: int = 2048,
        radius_scale: float = 2.0,
        min_elevation_deg: float = -10.0,
        hidden: int = 64,
        sh_degree: int = 1,
        sky_colors: bool = False,
    ) -> None:
        super().__init__()
        self.sky_colors = sky_colors
        self.num_points = num_points
        self.radius_scale = radius_scale
        self.min_elevation_deg = min_elevation_deg
        self.num_bases = num_sh_bases(sh_degree)
        # In: rgb (3), seen flag (1), direction (3). Out: SH-DC residual (3), log-scale residual (1).
        self.refine = mlp(7, hidden, 4, num_layers=3)
        # Fixed per model: kept as a buffer (moves with the model, not in checkpoints).
        self.register_buffer("directions", dome_directions(num_points, min_elevation_deg, torch.device("cpu")),
                             persistent=False)

    @torch.no_grad()
    def build_dome(self, points: torch.Tensor, source: Views) -> SkyDome:
        """Place the dome around ``points`` [N, 3] (segment frame) and colour it from ``source``."""
        with full_precision(points.device):  # projection into the sources needs fp32
            return self._build_dome(points, source)

    def _build_dome(self, points: torch.Tensor, source: Views) -> SkyDome:
        lo, hi = points.min(dim=0).values, points.max(dim=0).values
        radius = self.radius_scale * 0.5 * (hi - lo).norm().clamp(min=1.0)
        dirs = self.directions.to(points.device)
        means = 0.5 * (lo + hi) + radius * dirs
        rgb, seen = first_view_colors(means, source, self.sky_colors)
        # log sqrt(cap area / points), cap area = 2 pi r^2 (1 - sin(min elevation)).
        cap_per_point = 2 * math.pi * (1 - math.sin(math.radians(self.min_elevation_deg))) / self.num_points
        return SkyDome(means, dirs, rgb, seen, radius.log() + 0.5 * math.log(cap_per_point))

    def forward(self, dome: SkyDome) -> GaussianParams:
        """Opaque, isotropic dome Gaussians [B] with refined colour (SH [B, bases, 3]) and scale."""
        out = self.refine(torch.cat([dome.rgb, dome.seen[:, None].float(), dome.dirs], dim=-1))
        n = dome.means.shape[0]
        sh = torch.zeros(n, self.num_bases, 3, device=out.device, dtype=out.dtype)
        sh = torch.cat([(rgb_to_sh0(dome.rgb) + out[:, :3])[:, None], sh[:, 1:]], dim=1)
        scales = torch.exp(dome.log_scale + torch.tanh(out[:, 3:4])).expand(n, 3)
        quats = torch.zeros(n, 4, device=out.device, dtype=out.dtype)
        quats[:, 0] = 1.0
        return GaussianParams(
            means=dome.means,
            quats=quats,
            scales=scales,
            opacities=torch.ones(n, device=out.device, dtype=out.dtype),
            sh=sh,
        )
