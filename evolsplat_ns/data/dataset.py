"""MultiSceneDataset: many scenes -> segments -> samples of source and target views.

Split. The last ``num_eval_scenes`` scenes (or those named in ``eval_scenes``) are eval scenes. In
an eval scene every ``eval_frame_interval``-th frame is held out; held-out frames are only ever
targets of eval samples: no training sample, no source view and no point cloud uses them. Eval
scenes are otherwise unseen in training unless ``train_on_eval_scenes``. A one-scene dataset trains
on the non-held-out frames of its single scene (there is nothing else to train on).

Segments are built per scene from its non-held-out ("context") frames; their keyframes are every
``keyframe_interval``-th context frame. Each held-out frame is attached to the segment whose
frames are nearest to it. Sample poses are in the segment frame (vehicle frame at the segment's
first frame), OpenCV camera axes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro

from evolsplat_ns.data.cache import PointCloudCache
from evolsplat_ns.data.pointcloud.base import PointCloudGeneratorConfig, make_generator
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.sources import get_source
from evolsplat_ns.data.scheduler import SegmentScheduler
from evolsplat_ns.data.segments import (
    SegmentSpec, SelectionMode, eval_frame_mask, nearest_sources, select_train_keyframes, split_segments,
)
from evolsplat_ns.data.types import PointCloud, Sample, SegmentKey
from evolsplat_ns.utils.errors import ConfigError


@dataclass
class MultiSceneDatasetConfig:
    data: tyro.conf.Suppress[Path] = Path("outputs/demo/data-192x128")
    """A scene folder, or a folder of scene folders (e.g. drivestudio processed/training). Not a
    command-line flag: the data manager's ``data`` (ns-train ``--data``) sets it."""
    data_source: str = "drivestudio"
    """Registered data source (entry-point group evolsplat_ns.data_sources) that reads ``data``."""
    downscale: float = 1.0
    """Load images at 1/downscale resolution (intrinsics scaled to match)."""
    cameras: Optional[tuple[int, ...]] = None
    """Camera ids to use (default: all present). They must share one image size."""
    segment_length: int = 20
    """Frames per segment (0 = whole scene)."""
    segment_stride: int = 10
    """Frames between segment starts (< segment_length overlaps)."""
    keyframe_interval: int = 1
    """Every k-th context frame of a segment is a keyframe (a candidate source or target)."""
    num_source_keyframes: int = 3
    """Keyframes per training sample whose images are the network input (all cameras each)."""
    num_target_keyframes: int = 1
    """Keyframes per training sample that are rendered and supervised (all cameras each)."""
    selection: SelectionMode = "nearest"
    """Source/target selection: ``between``, ``beside`` or ``nearest`` (EVolSplat)."""
    num_eval_scenes: int = 1
    """The last this many scenes are eval (held-out) scenes."""
    eval_scenes: tuple[str, ...] = ()
    """Names of eval scenes (overrides ``num_eval_scenes``)."""
    eval_frame_interval: int = 4
    """Hold out every k-th frame of eval scenes (0 = none)."""
    train_on_eval_scenes: bool = False
    """Also train on the non-held-out frames of eval scenes (default: eval scenes are unseen)."""
    iters_per_segment: int = 4
    """Iterations spent on a segment before switching."""
    segment_order: Literal["sequential", "shuffle"] = "shuffle"
    """Order in which training segments are visited (reshuffled each pass, or dataset order)."""
    pointcloud_generator: str = "auto"
    """Registered generator name; ``auto`` = lidar if present, else depth."""
    pointcloud: PointCloudGeneratorConfig = field(default_factory=PointCloudGeneratorConfig)
    """Options shared by all generators (sparsity, filters, voxel size, crop)."""
    cache_max_mb: float = 2048.0
    """Memory bound of the point-cloud cache (LRU); 0 = unbounded."""
    preload: bool = True
    """Build the next segment's point cloud in a background thread."""
    load_depth: bool = False
    """Load depth maps into samples (the depth point-cloud generator reads them on its own)."""
    load_sky_masks: bool = False
    """Load sky masks into samples (nothing in the model reads them; the point-cloud generators'
    sky filter reads them on its own)."""
    load_dynamic_masks: bool = False
    """Load dynamic-object masks into samples."""
    load_lidar_for_eval: bool = True
    """Load the held-out frames' LiDAR for the depth metrics."""
    seed: int = 0
    """Seed of the segment order and of source/target selection."""


class MultiSceneDataset:
    """Scenes, their segments, the split, the segment scheduler and the point-cloud cache."""

    def __init__(self, config: MultiSceneDatasetConfig):
        self.config = c = config
        source = get_source(c.data_source)
        self.scenes = [source.open_scene(p, c.downscale, c.cameras) for p in source.find_scenes(Path(c.data))]
        self.eval_scene_ids = self._pick_eval_scenes()
        self.segments: list[SegmentSpec] = []
        self.eval_items: list[tuple[int, int]] = []  # (segment index, held-out frame)
        for si, scene in enumerate(self.scenes):
            self._index_scene(si, scene)
        self._index_of = {self.key(i): i for i in range(len(self.segments))}
        single = len(self.scenes) == 1
        self.train_segment_ids = [
            i for i, s in enumerate(self.segments)
            if s.scene_index not in self.eval_scene_ids or c.train_on_eval_scenes or single
        ]
        self._check_keyframe_counts()
        self.rng = np.random.default_rng(c.seed)
        self.scheduler = SegmentScheduler(len(self.train_segment_ids), c.iters_per_segment, c.segment_order, c.seed)
        self.cache = PointCloudCache(self._build_point_cloud, int(c.cache_max_mb * 2**20), c.preload)
        self._generators: dict[str, object] = {}

    # -- indexing ------------------------------------------------------------------------------

    def _pick_eval_scenes(self) -> set[int]:
        names = [s.name for s in self.scenes]
        if self.config.eval_scenes:
            unknown = [n for n in self.config.eval_scenes if n not in names]
            if unknown:
                raise ConfigError(f"eval_scenes {unknown} not found under {self.config.data}; scenes: {names}")
            return {names.index(n) for n in self.config.eval_scenes}
        k = min(self.config.num_eval_scenes, len(self.scenes))
        return set(range(len(self.scenes) - k, len(self.scenes)))

    def _index_scene(self, si: int, scene: SceneData) -> None:
        c = self.config
        held = eval_frame_mask(scene.frames, c.eval_frame_interval) if si in self.eval_scene_ids else None
        context = [t for i, t in enumerate(scene.frames) if held is None or not held[i]]
        for k, frames in enumerate(split_segments(context, c.segment_length, c.segment_stride)):
            self.segments.append(SegmentSpec(si, k, frames))
        if held is None:
            return
        for t in (t for i, t in enumerate(scene.frames) if held[i]):
            self.eval_items.append((self.nearest_segment(si, t), t))

    def nearest_segment(self, scene_index: int, frame: int) -> int:
        """Index of the scene's segment whose frames are nearest to ``frame`` (ties: nearest
        centre): where held-out frames and camera-path poses attach."""
        candidates = [i for i, s in enumerate(self.segments) if s.scene_index == scene_index]
        if not candidates:
            raise ValueError(f"scene {self.scenes[scene_index].name} has no segments")
        cost = [min(abs(frame - f) for f in self.segments[i].frames)
                + 1e-3 * abs(frame - np.mean(self.segments[i].frames)) for i in candidates]
        return candidates[int(np.argmin(cost))]

    def _check_keyframe_counts(self) -> None:
        """Fail at start-up, not at the first sample, if a training segment is too short."""
        c = self.config
        need = c.num_source_keyframes + c.num_target_keyframes
        short = [(str(self.key(i)), len(self.keyframes(i))) for i in self.train_segment_ids
                 if len(self.keyframes(i)) < need]
        if short:
            raise ConfigError(
                f"{len(short)} training segment(s) have fewer keyframes than num_source_keyframes + "
                f"num_target_keyframes = {need}, e.g. {short[:3]} (segment, keyframes); lower those "
                f"settings or keyframe_interval ({c.keyframe_interval}), or raise segment_length "
                f"({c.segment_length})")

    def segment_index(self, key: SegmentKey) -> int:
        """Index into ``segments`` of the segment named by ``key``."""
        if key not in self._index_of:
            raise KeyError(f"segment {key} is not in the dataset under {self.config.data}")
        return self._index_of[key]

    def key(self, segment_index: int) -> SegmentKey:
        s = self.segments[segment_index]
        return SegmentKey(self.scenes[s.scene_index].name, s.segment_index)

    def keyframes(self, segment_index: int) -> list[int]:
        return self.segments[segment_index].frames[:: max(1, self.config.keyframe_interval)]

    @property
    def num_train_segments(self) -> int:
        return len(self.train_segment_ids)

    # -- samples -------------------------------------------------------------------------------

    def next_train_sample(self) -> Sample:
        """The next training sample under the scheduler; preloads the following segment."""
        step = self.scheduler.next()
        seg_id = self.train_segment_ids[step.segment]
        kf = self.keyframes(seg_id)
        scene = self.scenes[self.segments[seg_id].scene_index]
        c = self.config
        src, tgt = select_train_keyframes(kf, c.num_source_keyframes, c.num_target_keyframes, c.selection,
                                          self.rng, scene.ego_to_world)
        if step.is_new_segment and c.preload:
            nxt = self.scheduler.peek_next_segment()
            if nxt is not None:
                self.cache.preload(self.train_segment_ids[nxt])
        return self.load_sample(seg_id, src, tgt, is_new_segment=step.is_new_segment)

    def eval_sample(self, i: int) -> Sample:
        """Eval item ``i``: its held-out frame is the target; sources are the nearest keyframes."""
        seg_id, t = self.eval_items[i]
        scene = self.scenes[self.segments[seg_id].scene_index]
        src = nearest_sources(self.keyframes(seg_id), [t], self.config.num_source_keyframes, scene.ego_to_world)
        return self.load_sample(seg_id, src, [t], lidar=self.config.load_lidar_for_eval)

    def load_sample(self, seg_id: int, source: list[int], target: list[int], *,
                    is_new_segment: bool = False, lidar: bool = False) -> Sample:
        c = self.config
        seg = self.segments[seg_id]
        scene = self.scenes[seg.scene_index]
        seg_to_world = scene.ego_to_world[seg.frames[0]]
        seg_from_world = np.linalg.inv(seg_to_world)
        opts = dict(depth=c.load_depth, sky=c.load_sky_masks, dynamic=c.load_dynamic_masks)
        return Sample(
            key=self.key(seg_id),
            source=scene.load_views(source, seg_from_world, **opts),
            target=scene.load_views(target, seg_from_world, **opts),
            segment_to_world=torch.from_numpy(seg_to_world).float(),
            segment_frames=list(seg.frames),
            lidar=scene.load_lidar(target, seg_from_world) if lidar and scene.layout.has("lidar") else None,
            is_new_segment=is_new_segment,
        )

    # -- point clouds --------------------------------------------------------------------------

    def point_cloud(self, segment_index: int) -> PointCloud:
        """The segment's RGB point cloud (segment frame), from the LRU cache."""
        return self.cache.get(segment_index)

    def _generator_name(self, scene: SceneData) -> str:
        name = self.config.pointcloud_generator
        if name == "auto":
            return "lidar" if scene.layout.has("lidar") else "depth"
        return name

    def _build_point_cloud(self, segment_index: int) -> PointCloud:
        seg = self.segments[segment_index]
        scene = self.scenes[seg.scene_index]
        name = self._generator_name(scene)
        if name not in self._generators:
            shared = {f.name: getattr(self.config.pointcloud, f.name)
                      for f in fields(PointCloudGeneratorConfig) if f.name != "_target"}
            self._generators[name] = make_generator(name, **shared)
        pc = self._generators[name].generate(scene, seg.frames)
        if len(pc) == 0:
            warnings.warn(f"segment {self.key(segment_index)} has no points")
        return pc

    def state_dict(self) -> dict:
        """Position of the data stream (scheduler + selection RNG) for exact resume."""
        return {"scheduler": self.scheduler.state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        self.cache.close()
