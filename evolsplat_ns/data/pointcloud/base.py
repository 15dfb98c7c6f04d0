"""The RGB point-cloud generator interface and the filtering every generator shares.

A generator turns one segment of a scene into a :class:`PointCloud` in the segment frame:
background points with colours in [0, 1], plus the points of moving instances in their box-local
frames. Subclasses only say where raw coloured points come from (:meth:`raw_points`); sparsity,
dynamic split, crop, voxel downsampling and outlier removal are shared here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Literal, Sequence, Type

import numpy as np
import torch
from nerfstudio.configs.base_config import InstantiateConfig

from evolsplat_ns.data.actors import ActorTrack, split_by_tracks, track_from_boxes
from evolsplat_ns.data.pointcloud import ops
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.types import PointCloud


@dataclass
class PointCloudGeneratorConfig(InstantiateConfig):
    """Options shared by every generator."""

    _target: Type = field(default_factory=lambda: RGBPointCloudGenerator)
    frame_stride: int = 1
    """Use every k-th frame of the segment (2 = EVolSplat's Drop50 sparsity)."""
    keep_fraction: float = 1.0
    """Random fraction of points kept after filtering (sparsity experiments)."""
    filter_sky: bool = True
    """Drop points that land on sky-mask pixels (when sky masks exist)."""
    depth_consistency_tol: float | None = None
    """Relative tolerance against depth maps; points disagreeing more are dropped (None = off)."""
    voxel_size: float = 0.05
    """Voxel downsampling in metres (0 = off)."""
    outlier_removal: Literal["none", "voxel_count", "statistical"] = "voxel_count"
    """``voxel_count``: drop points in 0.5 m cells holding fewer than ``outlier_min_points``;
    ``statistical``: open3d statistical outlier removal (``outlier_nb`` neighbours, ``outlier_std``)."""
    outlier_min_points: int = 2
    """``voxel_count``: fewest points a 0.5 m cell must hold to be kept."""
    outlier_nb: int = 16
    """``statistical``: neighbours per point."""
    outlier_std: float = 2.0
    """``statistical``: drop points farther than this many standard deviations."""
    crop_radius: float = 60.0
    """Keep points within this horizontal distance (m) of the segment's ego path (0 = off)."""
    crop_z: tuple[float, float] = (-5.0, 30.0)
    """Keep points with z (segment frame, up) in this range."""
    split_dynamic: bool = True
    """Move points inside boxes of moving instances to per-instance object-local clouds (actors)."""
    dynamic_motion_threshold: float = 0.5
    """An instance is moving if its box centre travels more than this (m) within the segment;
    instances that move less stay in the static cloud."""
    dynamic_box_margin: float = 0.1
    """A point belongs to a moving actor if it lies within this margin (m) of its box's sides and top..."""
    dynamic_ground_clearance: float = 0.1
    """...and more than this (m) above the box's floor: road points under a car stay static."""
    device: str = "cpu"
    """Device the generator computes on (``cuda`` is faster for depth back-projection)."""
    seed: int = 0
    """Seed of ``keep_fraction``'s random subsampling."""


class RGBPointCloudGenerator:
    """Base generator. Subclasses implement :meth:`raw_points`."""

    config: PointCloudGeneratorConfig

    def __init__(self, config: PointCloudGeneratorConfig):
        self.config = config

    def raw_points(
        self, scene: SceneData, frames: Sequence[int], seg_from_world: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coloured points before shared filtering: xyz [N, 3] (segment frame), rgb [N, 3] in
        [0, 1], frame index [N]."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_points")

    def generate(self, scene: SceneData, frames: Sequence[int]) -> PointCloud:
        """The point cloud of a segment whose frame is the vehicle frame at ``frames[0]``."""
        cfg = self.config
        seg_to_world = scene.ego_to_world[frames[0]]
        seg_from_world = np.linalg.inv(seg_to_world)
        used = list(frames)[:: max(1, cfg.frame_stride)]
        pts, rgb, fids = self.raw_points(scene, used, seg_from_world)
        n_raw = pts.shape[0]
        dynamic, tracks, dynamic_frames = {}, {}, {}
        if cfg.split_dynamic:
            tracks = self._moving_tracks(scene, frames, seg_from_world)
            split = split_by_tracks(pts, rgb, fids, tracks, cfg.dynamic_box_margin, cfg.dynamic_ground_clearance)
            pts, rgb, fids = pts[split.background], rgb[split.background], fids[split.background]
            dynamic, dynamic_frames = split.dynamic, split.dynamic_frames
            tracks = {k: tracks[k] for k in dynamic}
        keep = self._crop_mask(scene, frames, seg_from_world, pts)
        pts, rgb, fids = pts[keep], rgb[keep], fids[keep]
        pts, rgb, fids = ops.voxel_downsample_frames(pts, rgb, fids, cfg.voxel_size)
        keep = self._outlier_mask(pts)
        pts, rgb, fids = pts[keep], rgb[keep], fids[keep]
        if cfg.keep_fraction < 1.0:
            g = torch.Generator().manual_seed(cfg.seed)
            idx = torch.randperm(pts.shape[0], generator=g)[: int(round(cfg.keep_fraction * pts.shape[0]))]
            pts, rgb, fids = pts[idx.to(pts.device)], rgb[idx.to(pts.device)], fids[idx.to(pts.device)]
        if pts.shape[0] == 0:
            warnings.warn(f"scene {scene.name} frames {frames[0]}..{frames[-1]}: no points survive "
                          f"point-cloud generation ({n_raw} raw); check LiDAR/depth and crop settings")
        meta = {"generator": type(self).__name__, "raw_points": n_raw, "points": pts.shape[0],
                "frames": used, "scene": scene.name}
        return PointCloud(points=pts.float(), colors=rgb.float().clamp(0, 1), dynamic=dynamic, tracks=tracks,
                          metadata=meta, dynamic_frames=dynamic_frames, frame_ids=fids.long())

    # -- shared filters -----------------------------------------------------------------------

    def _crop_mask(self, scene: SceneData, frames, seg_from_world, pts: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        keep = (pts[:, 2] >= cfg.crop_z[0]) & (pts[:, 2] <= cfg.crop_z[1])
        if cfg.crop_radius > 0:
            path = np.stack([(seg_from_world @ scene.ego_to_world[t])[:3, 3] for t in frames])
            path_t = torch.as_tensor(path[:, :2], dtype=pts.dtype, device=pts.device)
            d = torch.cdist(pts[:, :2], path_t).min(dim=1).values
            keep &= d <= cfg.crop_radius
        return keep

    def _outlier_mask(self, pts: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.outlier_removal == "voxel_count":
            return ops.sparse_voxel_mask(pts, 0.5, cfg.outlier_min_points)
        if cfg.outlier_removal == "statistical" and pts.shape[0] > cfg.outlier_nb:
            return ops.statistical_outlier_mask(pts, cfg.outlier_nb, cfg.outlier_std)
        return torch.ones(pts.shape[0], dtype=torch.bool, device=pts.device)

    def _moving_tracks(self, scene: SceneData, frames: Sequence[int], seg_from_world: np.ndarray) -> dict[str, ActorTrack]:
        """Box tracks (segment frame) of the instances moving more than ``dynamic_motion_threshold``;
        the split itself is :func:`~evolsplat_ns.data.actors.split_by_tracks` (stage 2's flow
        discovery splits by its pseudo-box tracks with the same function)."""
        if not scene.layout.has("instances"):
            _warn_once(f"scene {scene.name} has no instances/instances_info.json: moving objects cannot be "
                       "separated by box tracks and train as static points (unless stage 2's flow discovery "
                       "finds them: --pipeline.model.stage2.discover-without-boxes)")
            return {}
        seg_from_world_t = torch.as_tensor(seg_from_world, dtype=torch.float64)
        return {str(k): track_from_boxes(str(k), boxes, list(frames), seg_from_world_t)
                for k, boxes in moving_instances(scene, frames, self.config.dynamic_motion_threshold).items()}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def moving_instances(scene: SceneData, frames: Sequence[int], threshold: float) -> dict[str, dict]:
    """Instances whose box centre moves more than ``threshold`` m over ``frames``.

    Returns instance id -> {frame: (obj_to_world [4, 4], size [l, w, h])}.
    """
    out = {}
    frame_set = set(frames)
    for inst_id, info in scene.instances().items():
        ann = info.get("frame_annotations", {})
        boxes = {int(t): (np.asarray(T, dtype=np.float64), np.asarray(s, dtype=np.float64))
                 for t, T, s in zip(ann.get("frame_idx", []), ann.get("obj_to_world", []),
                                    ann.get("box_size", [])) if int(t) in frame_set}
        if len(boxes) < 1:
            continue
        centres = np.stack([T[:3, 3] for T, _ in boxes.values()])
        if np.linalg.norm(centres.max(0) - centres.min(0)) > threshold:
            out[inst_id] = boxes
    return out


def make_generator(name: str, **overrides) -> RGBPointCloudGenerator:
    """Instantiate the generator registered as ``name`` (entry point) with config ``overrides``."""
    from evolsplat_ns import registry

    cfg_cls = registry.get("pointcloud_generators", name)
    cfg = cfg_cls() if isinstance(cfg_cls, type) else cfg_cls
    unknown = sorted(set(overrides) - {f.name for f in fields(cfg)})
    if unknown:
        raise ValueError(f"point-cloud generator {name!r} ({type(cfg).__name__}) has no option(s) {unknown}; "
                         f"use that generator's own options, or the generator these options belong to")
    return replace(cfg, **overrides).setup()
