"""LiDAR and depth-map points together (depth fills where LiDAR is sparse, e.g. high facades)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Type

import numpy as np
import torch

from evolsplat_ns.data.pointcloud.depth import DepthPointCloudConfig, DepthPointCloudGenerator
from evolsplat_ns.data.pointcloud.lidar import LidarPointCloudConfig, LidarPointCloudGenerator
from evolsplat_ns.data.scene import SceneData


class HybridPointCloudGenerator(DepthPointCloudGenerator):
    config: "HybridPointCloudConfig"

    def raw_points(self, scene: SceneData, frames: Sequence[int], seg_from_world: np.ndarray):
        lidar = LidarPointCloudGenerator(LidarPointCloudConfig(**_shared(self.config, LidarPointCloudConfig)))
        parts = [lidar.raw_points(scene, frames, seg_from_world), super().raw_points(scene, frames, seg_from_world)]
        return tuple(torch.cat(x) for x in zip(*parts))


def _shared(cfg, target_cls) -> dict:
    names = {f for f in target_cls.__dataclass_fields__ if f != "_target"}
    return {k: getattr(cfg, k) for k in names}


@dataclass
class HybridPointCloudConfig(DepthPointCloudConfig):
    _target: Type = field(default_factory=lambda: HybridPointCloudGenerator)
