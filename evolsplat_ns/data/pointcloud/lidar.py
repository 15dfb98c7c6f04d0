"""LiDAR point clouds coloured by projection into the cameras of the same timestamp."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Type

import numpy as np
import torch

from evolsplat_ns.data.layout import DatasetError
from evolsplat_ns.data.pointcloud import ops
from evolsplat_ns.data.pointcloud.base import PointCloudGeneratorConfig, RGBPointCloudGenerator
from evolsplat_ns.data.scene import SceneData


class LidarPointCloudGenerator(RGBPointCloudGenerator):
    """Each sweep's points are coloured by the first camera of the same frame that sees them inside
    the image, unoccluded (depth map if present, else the sweep's own z-buffer) and not sky; points
    no camera sees are dropped (they would carry no colour)."""

    config: "LidarPointCloudConfig"

    def raw_points(self, scene: SceneData, frames: Sequence[int], seg_from_world: np.ndarray):
        if not scene.layout.has("lidar"):
            raise DatasetError(scene.layout.lidar_path(frames[0]), "missing LiDAR",
                               "use the 'depth' point-cloud generator for scenes without LiDAR")
        dev = torch.device(self.config.device)
        use_depth = self.config.depth_consistency_tol is not None
        pts_all, rgb_all, fid_all = [], [], []
        for t in frames:
            sweep = scene.load_lidar([t], seg_from_world)
            views = scene.load_views([t], seg_from_world, sky=self.config.filter_sky, depth=use_depth)
            pts = sweep.points.to(dev)
            rgb, seen = ops.colorize(
                pts, views.images.to(dev), views.intrinsics.to(dev), views.camtoworlds.to(dev),
                sky_masks=None if views.sky_masks is None else views.sky_masks.to(dev),
                depths=None if views.depths is None else views.depths.to(dev),
                occlusion_tol=self.config.depth_consistency_tol or 0.05,
            )
            pts_all.append(pts[seen])
            rgb_all.append(rgb[seen])
            fid_all.append(torch.full((int(seen.sum()),), t, device=dev))
        return torch.cat(pts_all), torch.cat(rgb_all), torch.cat(fid_all)


@dataclass
class LidarPointCloudConfig(PointCloudGeneratorConfig):
    _target: Type = field(default_factory=lambda: LidarPointCloudGenerator)
