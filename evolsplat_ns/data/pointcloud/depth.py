"""Point clouds from per-image depth maps (``depth/{t:03d}_{cam}.npy``), coloured by their pixel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Type

import numpy as np
import torch

from evolsplat_ns.data.layout import DatasetError
from evolsplat_ns.data.pointcloud.base import PointCloudGeneratorConfig, RGBPointCloudGenerator
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.types import Views


def unproject_depth(views: Views, pixel_stride: int, max_depth: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Back-project every ``pixel_stride``-th pixel with 0 < depth <= max_depth (not sky).

    Returns xyz [N, 3] in the views' reference frame (OpenCV cameras), rgb [N, 3], view index [N].
    """
    assert views.depths is not None
    V, H, W, _ = views.images.shape
    ys = torch.arange(pixel_stride // 2, H, pixel_stride, device=views.images.device)
    xs = torch.arange(pixel_stride // 2, W, pixel_stride, device=views.images.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    z = views.depths[:, gy, gx]  # [V, h, w]
    ok = (z > 0) & (z <= max_depth)
    if views.sky_masks is not None:
        ok &= ~views.sky_masks[:, gy, gx]
    K = views.intrinsics
    x = (gx[None] + 0.5 - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None] * z
    y = (gy[None] + 0.5 - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None] * z
    cam = torch.stack([x, y, z], dim=-1)  # [V, h, w, 3] OpenCV camera frame
    R, tvec = views.camtoworlds[:, :3, :3], views.camtoworlds[:, :3, 3]
    world = torch.einsum("vij,vhwj->vhwi", R, cam) + tvec[:, None, None]
    rgb = views.images[:, gy, gx]
    vid = torch.arange(V, device=z.device)[:, None, None].expand_as(z)
    return world[ok], rgb[ok], vid[ok]


class DepthPointCloudGenerator(RGBPointCloudGenerator):
    config: "DepthPointCloudConfig"

    def raw_points(self, scene: SceneData, frames: Sequence[int], seg_from_world: np.ndarray):
        if not scene.layout.has("depth"):
            raise DatasetError(scene.layout.depth_path(frames[0], scene.cameras[0]), "missing depth maps",
                               "supply depth/{t:03d}_{cam}.npy or use the 'lidar' generator")
        pts, rgb, fid = [], [], []
        for t in frames:
            views = scene.load_views([t], seg_from_world, depth=True, sky=self.config.filter_sky)
            views = views.to(self.config.device)
            p, c, _ = unproject_depth(views, self.config.pixel_stride, self.config.max_depth)
            pts.append(p)
            rgb.append(c)
            fid.append(torch.full((p.shape[0],), t, device=p.device))
        return torch.cat(pts), torch.cat(rgb), torch.cat(fid)


@dataclass
class DepthPointCloudConfig(PointCloudGeneratorConfig):
    _target: Type = field(default_factory=lambda: DepthPointCloudGenerator)
    pixel_stride: int = 4
    """Back-project every k-th pixel in x and y."""
    max_depth: float = 80.0
    """Ignore depths beyond this (m); far depth is noisy and mostly background."""
