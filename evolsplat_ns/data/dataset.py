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

Short and slow scenes adapt (``eval_hold_out="auto"``, the default; each choice is in
:meth:`MultiSceneDataset.selection_report` and warned once):

- hold-out: an eval scene of >= 2 frames holds out frames; if ``eval_frame_interval`` would hold
  out none, all, or only the first/last of them, every 2nd frame is held out instead (offset 1:
  frame 1 of 2 or 3).
  A one-frame scene holds out **cameras**: each camera in turn is the target of its own segment,
  whose sources are the other cameras and whose point cloud that camera does not colour.
- keyframes: a segment whose ``keyframe_interval`` leaves fewer than ``num_source_keyframes +
  num_target_keyframes`` keyframes uses every frame as a keyframe.
- selection: see :func:`evolsplat_ns.data.segments.select_train_views` (fewer targets, then
  fewer sources; one frame: one camera is the target of the others).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro

from evolsplat_ns.data.cache import ImageCache, PointCloudCache
from evolsplat_ns.data.observations import SegmentObservations
from evolsplat_ns.data.pointcloud.base import PointCloudGeneratorConfig, make_generator
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.sources import get_source
from evolsplat_ns.data.scheduler import SegmentScheduler
from evolsplat_ns.data.sharding import Shard, assign_segments, shard_seed
from evolsplat_ns.data.segments import (
    SegmentSpec, SelectionMode, ViewPair, adapt_counts, can_sample, eval_frame_mask, nearest_sources,
    select_train_views, split_segments,
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
    """Camera ids to use, any subset in any rig (default: all present)."""
    image_size: Optional[tuple[int, int]] = None
    """(W, H) every camera loads at (default: the first selected camera's size / downscale); other
    sizes are resized to it with K scaled per axis."""
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
    eval_hold_out: Literal["auto", "frames", "cameras"] = "auto"
    """What eval scenes hold out: ``frames`` (every ``eval_frame_interval``-th), ``cameras`` (each of
    ``eval_cameras`` in turn, at every frame) or ``auto`` (frames, adapted to short scenes; cameras
    for a one-frame scene)."""
    eval_cameras: tuple[int, ...] = ()
    """Cameras held out in camera hold-out (default: every camera, one at a time)."""
    train_on_eval_scenes: bool = False
    """Also train on the non-held-out frames of eval scenes (default: eval scenes are unseen)."""
    iters_per_segment: int = 4
    """Iterations spent on a segment before switching."""
    segment_order: Literal["sequential", "shuffle"] = "shuffle"
    """Order in which training segments are visited (reshuffled each pass, or dataset order)."""
    pointcloud_generator: str = "auto"
    """Registered generator name; ``auto`` = hybrid where a scene has LiDAR and depth maps (LiDAR
    misses building tops and the road next to the car; synthetic scenes), lidar where it has only
    LiDAR (drivestudio's Waymo), else depth."""
    pointcloud: PointCloudGeneratorConfig = field(default_factory=PointCloudGeneratorConfig)
    """Options shared by all generators (sparsity, filters, voxel size, crop); a generator's own
    config class (e.g. ``DepthPointCloudConfig(pixel_stride=1)``) also sets that generator's options."""
    cache_max_mb: float = 2048.0
    """Memory bound of the point-cloud cache (LRU); 0 = unbounded."""
    image_cache_mb: float = 1024.0
    """Memory bound of the decoded-image cache (uint8, LRU, all scenes); 0 = off. A segment's
    samples revisit its frames, so most images are decoded once (960x640: 1.8 MB each)."""
    preload: bool = True
    """Build the next segment's point cloud in a background thread."""
    load_depth: bool = False
    """Load depth maps into samples (the depth point-cloud generator reads them on its own)."""
    load_sky_masks: bool = False
    """Load sky masks into training samples (the model's sky supervision, ``sky_loss_weight``, reads
    them; the point-cloud generators' sky filter reads them on its own; eval targets always
    carry them for the sky/non-sky metrics)."""
    load_dynamic_masks: bool = False
    """Load dynamic-object masks into samples."""
    load_lidar_for_eval: bool = True
    """Load the held-out frames' LiDAR for the depth metrics."""
    seed: int = 0
    """Seed of the segment order and of source/target selection."""


class MultiSceneDataset:
    """Scenes, their segments, the split, the segment scheduler and the point-cloud cache.

    With a ``shard`` (data-parallel training, :mod:`evolsplat_ns.data.sharding`) the training
    segments are this rank's share of them: ``train_segment_ids`` lists only those (the scheduler
    and the selection draw over them, from streams seeded per rank), ``all_train_segment_ids`` all
    of them and ``segment_owner`` the rank of each. Eval items are never sharded.
    """

    def __init__(self, config: MultiSceneDatasetConfig, shard: Optional[Shard] = None):
        self.config = c = config
        self.shard = shard or Shard()
        source = get_source(c.data_source)
        if c.image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0 (0 turns the decoded-image cache off), got {c.image_cache_mb} "
                             "(set pipeline.datamanager.dataset.image_cache_mb)")
        self.image_cache = ImageCache(int(c.image_cache_mb * 2**20)) if c.image_cache_mb > 0 else None
        self.scenes = [self._open(source, p) for p in source.find_scenes(Path(c.data))]
        self.eval_scene_ids = self._pick_eval_scenes()
        self.segments: list[SegmentSpec] = []
        self.eval_items: list[tuple[int, int]] = []  # (segment index, held-out frame)
        self.plans: dict[str, dict] = {}
        for si, scene in enumerate(self.scenes):
            self._index_scene(si, scene)
        self._index_of = {self.key(i): i for i in range(len(self.segments))}
        single = len(self.scenes) == 1
        self.all_train_segment_ids = [
            i for i, s in enumerate(self.segments) if s.held_out_camera is None
            and (s.scene_index not in self.eval_scene_ids or c.train_on_eval_scenes or single)
        ]
        shards = assign_segments([str(self.key(i)) for i in self.all_train_segment_ids], self.shard.world_size, c.seed)
        self.segment_owner: dict[SegmentKey, int] = {
            self.key(self.all_train_segment_ids[j]): r for r, part in enumerate(shards) for j in part}
        """Rank that trains each training segment (every one 0 in a one-process run)."""
        self.train_segment_ids = [self.all_train_segment_ids[j] for j in shards[self.shard.rank]]
        self._check_keyframe_counts()
        self._warn_adapted()
        seed = shard_seed(c.seed, self.shard)
        self.rng = np.random.default_rng(seed)
        self.scheduler = SegmentScheduler(len(self.train_segment_ids), c.iters_per_segment, c.segment_order, seed)
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

    def _open(self, source, path: Path) -> SceneData:
        scene = source.open_scene(path, self.config.downscale, self.config.cameras)
        scene = scene if self.config.image_size is None else scene.with_image_size(self.config.image_size)
        scene.image_cache = self.image_cache
        return scene

    def _hold_out_mode(self, scene: SceneData) -> str:
        mode = self.config.eval_hold_out
        if mode not in ("auto", "frames", "cameras"):
            raise ValueError(f"eval_hold_out={mode!r}: use 'auto', 'frames' or 'cameras'")
        if mode == "auto":
            return "frames" if len(scene.frames) >= 2 else "cameras"
        return mode

    def _held_out_frames(self, scene: SceneData) -> tuple[np.ndarray, int]:
        """Bool mask over the scene's frames and the interval that made it (auto adapts, see module)."""
        k = self.config.eval_frame_interval
        held = eval_frame_mask(scene.frames, k)
        # Short scenes: k may hold out nothing, everything, or only an end frame (a target no
        # source encloses, e.g. frame 2 of 3 for k = 4); every 2nd frame from frame 1 then does better.
        only_ends = held.any() and not held[1:-1].any()
        if self.config.eval_hold_out == "auto" and k > 2 and (not held.any() or held.all() or only_ends):
            k = 2
            held = eval_frame_mask(scene.frames, k)
        return held, k

    def _index_scene(self, si: int, scene: SceneData) -> None:
        c = self.config
        is_eval = si in self.eval_scene_ids
        mode = self._hold_out_mode(scene) if is_eval else "none"
        held, interval = self._held_out_frames(scene) if mode == "frames" else (None, c.eval_frame_interval)
        context = [t for i, t in enumerate(scene.frames) if held is None or not held[i]]
        first = len(self.segments)
        parts = split_segments(context, c.segment_length, c.segment_stride)
        for k, frames in enumerate(parts):
            self.segments.append(SegmentSpec(si, k, frames, whole_scene=len(parts) == 1))
        plan = {"frames": len(scene.frames), "cameras": {str(k): v for k, v in scene.camera_names.items()},
                "image_size": list(scene.common_size), "hold_out": mode}
        if mode == "frames":
            held_frames = [t for i, t in enumerate(scene.frames) if held[i]]
            self._attach(si, held_frames)
            plan.update(eval_frame_interval=interval, held_out_frames=held_frames)
        elif mode == "cameras" and c.eval_frame_interval > 0:
            plan["held_out_cameras"] = self._index_camera_hold_out(si, scene)
        plan["segments"] = len(self.segments) - first
        self.plans[scene.name] = plan

    def _attach(self, si: int, held_frames: list[int], held_out_camera: Optional[int] = None) -> None:
        """Eval items for ``held_frames``: each with its nearest segment (of that held-out camera)."""
        for t in held_frames:
            self.eval_items.append((self.nearest_segment(si, t, held_out_camera), t))

    def nearest_segment(self, scene_index: int, frame: int, held_out_camera: Optional[int] = None) -> int:
        """Index of the scene's segment whose frames are nearest to ``frame`` (ties: nearest
        centre): where held-out frames and camera-path poses attach. Only segments holding out
        ``held_out_camera`` are candidates (None: the scene's ordinary segments)."""
        candidates = [i for i, s in enumerate(self.segments)
                      if s.scene_index == scene_index and s.held_out_camera == held_out_camera]
        if not candidates:
            raise ValueError(f"scene {self.scenes[scene_index].name} has no segments")
        cost = [min(abs(frame - f) for f in self.segments[i].frames)
                + 1e-3 * abs(frame - np.mean(self.segments[i].frames)) for i in candidates]
        return candidates[int(np.argmin(cost))]

    def _index_camera_hold_out(self, si: int, scene: SceneData) -> list[int]:
        """Per held-out camera, eval segments over all frames; every frame of it is an eval target."""
        c = self.config
        cams = list(c.eval_cameras) or list(scene.cameras)
        unknown = [x for x in cams if x not in scene.cameras]
        if unknown:
            raise ValueError(f"eval_cameras {unknown} are not cameras of scene {scene.name} ({scene.cameras})")
        if len(scene.cameras) < 2:
            raise ValueError(f"scene {scene.name} has {len(scene.frames)} frame(s) and one camera: holding the camera "
                             "out, no view is left as a source for a target; such a scene needs a second camera "
                             "(or, with >= 2 frames, eval_hold_out='frames')")
        for cam in cams:
            base = sum(1 for s in self.segments if s.scene_index == si)
            parts = split_segments(scene.frames, c.segment_length, c.segment_stride)
            for k, frames in enumerate(parts):
                self.segments.append(SegmentSpec(si, base + k, frames, whole_scene=len(parts) == 1,
                                                 held_out_camera=cam))
            self._attach(si, list(scene.frames), cam)
        return cams

    def _check_keyframe_counts(self) -> None:
        """Fail at start-up, not at the first sample: a segment cut too short from a longer scene is
        a setting to fix; a whole short scene adapts unless it cannot give one target and one source."""
        c = self.config
        need = c.num_source_keyframes + c.num_target_keyframes
        ids = self.all_train_segment_ids + sorted({s for s, _ in self.eval_items})
        short = [(str(self.key(i)), len(self.keyframes(i))) for i in ids
                 if len(self.keyframes(i)) < need and not self.segments[i].whole_scene]
        if short:
            raise ConfigError(
                f"{len(short)} segment(s) have fewer keyframes than num_source_keyframes + "
                f"num_target_keyframes = {need}, e.g. {short[:3]} (segment, keyframes); lower those "
                f"settings or keyframe_interval ({c.keyframe_interval}), or raise segment_length "
                f"({c.segment_length})")
        single = [str(self.key(i)) for i in ids if not can_sample(
            len(self.keyframes(i)), len(self.scenes[self.segments[i].scene_index].cameras))]
        if single:
            raise ValueError(f"segment(s) {single[:3]} have one keyframe seen by one camera, so no view is "
                             "left as a source for a target: such a scene needs a second frame or camera")

    def _segment_plan(self, segment_index: int) -> dict:
        """Effective keyframes and source/target counts of a segment (what sampling will use)."""
        c = self.config
        kf = self.keyframes(segment_index)
        if len(kf) == 1:
            return {"keyframes": 1, "selection": "camera", "num_source_keyframes": 1, "num_target_keyframes": 1}
        ns, nt, mode = adapt_counts(len(kf), c.num_source_keyframes, c.num_target_keyframes, c.selection)
        return {"keyframes": len(kf), "selection": mode, "num_source_keyframes": ns, "num_target_keyframes": nt}

    def selection_report(self) -> dict:
        """Per scene: cameras, image size, hold-out, and per segment what sampling uses."""
        report = {}
        for name, plan in self.plans.items():
            segs = [i for i, s in enumerate(self.segments) if self.scenes[s.scene_index].name == name]
            report[name] = {**plan, "per_segment": {str(self.key(i)): self._segment_plan(i) for i in segs}}
        return report

    def _warn_adapted(self) -> None:
        """One warning per scene whose settings were adapted (short or slow scene)."""
        c = self.config
        for name, plan in self.selection_report().items():
            notes = []
            if plan.get("eval_frame_interval", c.eval_frame_interval) != c.eval_frame_interval:
                notes.append(f"holds out every {plan['eval_frame_interval']}nd frame (eval_frame_interval "
                             f"{c.eval_frame_interval} would hold out none, all or only an end frame)")
            if plan["hold_out"] == "cameras" and c.eval_hold_out == "auto":
                notes.append("holds out cameras (one frame)")
            segs = plan["per_segment"].values()
            if any((p["num_source_keyframes"], p["num_target_keyframes"]) != (c.num_source_keyframes,
                   c.num_target_keyframes) or p["selection"] != c.selection for p in segs):
                p = min(segs, key=lambda p: p["keyframes"])
                notes.append(f"samples {p['num_source_keyframes']} source + {p['num_target_keyframes']} target "
                             f"keyframe(s), selection '{p['selection']}' in segments of {p['keyframes']} keyframe(s)")
            if notes:
                warnings.warn(f"scene {name} ({plan['frames']} frame(s)): " + "; ".join(notes), stacklevel=3)

    def holds(self, key: SegmentKey) -> bool:
        """Whether this rank keeps ``key``'s state: its own training segments, and on rank 0 every
        segment no rank trains (eval segments, which only rank 0 evaluates). Always True in a
        one-process run."""
        owner = self.segment_owner.get(key)
        return owner == self.shard.rank if owner is not None else self.shard.rank == 0

    def segment_index(self, key: SegmentKey) -> int:
        """Index into ``segments`` of the segment named by ``key``."""
        if key not in self._index_of:
            raise KeyError(f"segment {key} is not in the dataset under {self.config.data}")
        return self._index_of[key]

    def key(self, segment_index: int) -> SegmentKey:
        s = self.segments[segment_index]
        return SegmentKey(self.scenes[s.scene_index].name, s.segment_index)

    def keyframes(self, segment_index: int) -> list[int]:
        """Every ``keyframe_interval``-th frame; every frame when that leaves too few (slow scenes)."""
        c = self.config
        seg = self.segments[segment_index]
        kf = seg.frames[:: max(1, c.keyframe_interval)]
        short = seg.whole_scene and len(kf) < c.num_source_keyframes + c.num_target_keyframes
        return list(seg.frames) if short else kf

    def eval_cameras(self, i: int) -> list[int]:
        """Camera ids of eval item ``i``'s target views, in target order: every camera of a held-out
        frame, or the one held-out camera."""
        seg = self.segments[self.eval_items[i][0]]
        return [seg.held_out_camera] if seg.held_out_camera is not None else list(self.scenes[seg.scene_index].cameras)

    @property
    def num_eval_views(self) -> int:
        """Target views over all eval items."""
        return sum(len(self.eval_cameras(i)) for i in range(len(self.eval_items)))

    @property
    def num_train_segments(self) -> int:
        return len(self.train_segment_ids)

    # -- samples -------------------------------------------------------------------------------

    def next_train_sample(self, uint8_rgb: bool = False) -> Sample:
        """The next training sample under the scheduler; preloads the following segment.
        ``uint8_rgb``: images as decoded (uint8), for a sample whose images :meth:`Views.to`
        turns into float32 on the device."""
        step = self.scheduler.next()
        seg_id = self.train_segment_ids[step.segment]
        kf = self.keyframes(seg_id)
        scene = self.scenes[self.segments[seg_id].scene_index]
        c = self.config
        src, tgt = select_train_views(kf, scene.cameras, c.num_source_keyframes, c.num_target_keyframes,
                                      c.selection, self.rng, scene.ego_to_world)
        if step.is_new_segment and c.preload:
            nxt = self.scheduler.peek_next_segment()
            if nxt is not None:
                self.cache.preload(self.train_segment_ids[nxt])
        return self.load_sample(seg_id, src, tgt, is_new_segment=step.is_new_segment, uint8_rgb=uint8_rgb)

    def eval_sample(self, i: int) -> Sample:
        """Eval item ``i``: its held-out frame is the target; sources are the nearest keyframes.

        Camera hold-out: the target is the held-out camera at that frame; sources are the other
        cameras of the nearest keyframes (the target's own frame included). The LiDAR sweep of a
        context frame is an input there, so no LiDAR depth metrics are computed against it.
        """
        seg_id, t = self.eval_items[i]
        seg = self.segments[seg_id]
        scene = self.scenes[seg.scene_index]
        src = nearest_sources(self.keyframes(seg_id), [t], self.config.num_source_keyframes, scene.ego_to_world)
        if seg.held_out_camera is None:
            return self.load_sample(seg_id, src, [t], lidar=self.config.load_lidar_for_eval, target_masks=True)
        sources = [(f, cam) for f in src for cam in scene.cameras if cam != seg.held_out_camera]
        return self.load_sample(seg_id, sources, [(t, seg.held_out_camera)], target_masks=True)

    def load_sample(self, seg_id: int, source: list[int] | list[ViewPair], target: list[int] | list[ViewPair],
                    *, is_new_segment: bool = False, lidar: bool = False, target_masks: bool = False,
                    uint8_rgb: bool = False) -> Sample:
        """Sample of segment ``seg_id``: ``source``/``target`` are frames (every camera each) or
        (frame, camera) pairs. ``target_masks`` loads the targets' dynamic masks where the scene
        has them, and their sky masks (the dynamic/static and sky/rest region metrics).
        ``uint8_rgb``: images as decoded (uint8, :class:`Views`)."""
        c = self.config
        seg = self.segments[seg_id]
        scene = self.scenes[seg.scene_index]
        seg_to_world = scene.ego_to_world[seg.frames[0]]
        seg_from_world = np.linalg.inv(seg_to_world)
        opts = dict(depth=c.load_depth, sky=c.load_sky_masks, dynamic=c.load_dynamic_masks, uint8_rgb=uint8_rgb)

        def views(spec, **extra):
            kw = {**opts, **extra}
            pairs = [p if isinstance(p, tuple) else None for p in spec]
            if all(p is not None for p in pairs):
                return scene.load_view_pairs(pairs, seg_from_world, **kw)
            return scene.load_views(spec, seg_from_world, **kw)

        target_frames = sorted({p[0] if isinstance(p, tuple) else p for p in target})
        return Sample(
            key=self.key(seg_id),
            source=views(source),
            target=views(target, **({"dynamic": True, "sky": True} if target_masks else {})),
            segment_to_world=torch.from_numpy(seg_to_world).float(),
            segment_frames=list(seg.frames),
            lidar=scene.load_lidar(target_frames, seg_from_world) if lidar and scene.layout.has("lidar") else None,
            is_new_segment=is_new_segment,
        )

    def observations(self, segment_index: int) -> SegmentObservations:
        """Lazy depth / flow / images of the segment's context frames and cameras (stage 2's
        processor); a held-out camera is left out, as from the point cloud."""
        seg = self.segments[segment_index]
        scene = self.scenes[seg.scene_index]
        cams = [c for c in scene.cameras if c != seg.held_out_camera]
        return SegmentObservations(scene, seg.frames, cams, np.linalg.inv(scene.ego_to_world[seg.frames[0]]))

    # -- point clouds --------------------------------------------------------------------------

    def point_cloud(self, segment_index: int) -> PointCloud:
        """The segment's RGB point cloud (segment frame), from the LRU cache."""
        return self.cache.get(segment_index)

    def _generator_name(self, scene: SceneData) -> str:
        name = self.config.pointcloud_generator
        if name == "auto":
            if scene.layout.has("lidar"):
                return "hybrid" if scene.layout.has("depth") else "lidar"
            return "depth"
        return name

    def _build_point_cloud(self, segment_index: int) -> PointCloud:
        seg = self.segments[segment_index]
        scene = self.scenes[seg.scene_index]
        name = self._generator_name(scene)
        if name not in self._generators:
            # Every field of ``pointcloud`` applies: the shared ones, and a generator's own (e.g.
            # DepthPointCloudConfig.pixel_stride) when ``pointcloud`` is that generator's config.
            options = {f.name: getattr(self.config.pointcloud, f.name)
                       for f in fields(self.config.pointcloud) if f.name != "_target"}
            self._generators[name] = make_generator(name, **options)
        if seg.held_out_camera is not None:  # the held-out camera colours no point of its segment
            scene = scene.subset([c for c in scene.cameras if c != seg.held_out_camera])
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
