"""Containers passed between data, point clouds and the model. Shapes and frames in each field.

All poses here are **OpenCV camera-to-segment** (x right, y down, z forward), where the segment
frame is the vehicle frame at the segment's first frame (see :mod:`evolsplat_ns.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


def _map_tensors(obj, fn):
    """A copy of dataclass ``obj`` with ``fn`` applied to every tensor field (None stays None)."""
    return replace(obj, **{f.name: fn(v) for f in fields(obj) if isinstance(v := getattr(obj, f.name), torch.Tensor)})


def rgb_float(images: torch.Tensor) -> torch.Tensor:
    """RGB images [..., 3] as float32 in [0, 1]: uint8 (0-255) ones divided by 255 where they are
    (on the device after a copy: the host never holds the 4x larger float copy), float ones as they are."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


@dataclass
class SegmentKey:
    """Identifies a segment: a scene name and the segment's index within that scene."""

    scene: str
    segment: int

    def __str__(self) -> str:
        return f"{self.scene}/seg{self.segment:03d}"

    @classmethod
    def parse(cls, text: str) -> "SegmentKey":
        """The key printed as ``SCENE/segNNN`` (checkpoints, PLY comments, CLI selectors)."""
        scene, sep, seg = text.rpartition("/seg")
        if not sep or not seg.isdigit():
            raise ValueError(f"{text!r} is not a segment key of the form SCENE/segNNN")
        return cls(scene, int(seg))

    def __hash__(self) -> int:
        return hash((self.scene, self.segment))


@dataclass
class Views:
    """A batch of V posed camera images of one segment.

    Attributes:
        images: [V, H, W, 3] float32 RGB in [0, 1]; uint8 (0-255) in a training sample on its way
            to the device (``MultiSceneDataset.next_train_sample(uint8_rgb=True)``: a quarter of
            the host memory to pin and of the bytes to copy). :meth:`to` gives float32 either way.
        intrinsics: [V, 3, 3] pinhole K in pixels of these (downscaled) images.
        camtoworlds: [V, 4, 4] OpenCV camera-to-segment-frame.
        frame_ids: [V] long, scene frame index t.
        cam_ids: [V] long, camera id (names: ``SceneData.camera_names``; Waymo 0 FRONT ... 4 SIDE_RIGHT).
        depths: optional [V, H, W] float32 OpenCV z-depth in metres, 0 = unknown.
        sky_masks: optional [V, H, W] bool, True = sky.
        dynamic_masks: optional [V, H, W] bool, True = dynamic object.
    """

    images: torch.Tensor
    intrinsics: torch.Tensor
    camtoworlds: torch.Tensor
    frame_ids: torch.Tensor
    cam_ids: torch.Tensor
    depths: Optional[torch.Tensor] = None
    sky_masks: Optional[torch.Tensor] = None
    dynamic_masks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def to_device_fn(self, fn) -> "Views":
        return _map_tensors(self, fn)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Views":
        """The views on ``device``, images float32 in [0, 1] (:func:`rgb_float` after the copy).
        ``non_blocking`` copies host-to-device asynchronously (from pinned memory the copy
        overlaps GPU work; from pageable memory it is staged at once)."""
        moved = self.to_device_fn(lambda t: t.to(device, non_blocking=non_blocking))
        return replace(moved, images=rgb_float(moved.images))

    def pin_memory(self) -> "Views":
        """The views in page-locked host memory (so a ``to(..., non_blocking=True)`` overlaps)."""
        return self.to_device_fn(lambda t: t if t.is_pinned() else t.pin_memory())

    def select(self, idx: torch.Tensor | list[int] | slice) -> "Views":
        """Views at indices ``idx`` (same order)."""
        return self.to_device_fn(lambda t: t[idx])


@dataclass
class LidarSweep:
    """LiDAR points of the segment's frames.

    Attributes:
        points: [N, 3] float32 xyz in the segment frame.
        frame_ids: [N] long, scene frame index of each point.
    """

    points: torch.Tensor
    frame_ids: torch.Tensor

    def to_device_fn(self, fn) -> "LidarSweep":
        return _map_tensors(self, fn)

    def to(self, device: torch.device | str) -> "LidarSweep":
        return self.to_device_fn(lambda t: t.to(device))


@dataclass
class Sample:
    """One training/eval sample: source and target views of a single segment.

    ``source`` holds ``num_source_keyframes * num_cams`` views, ``target`` holds
    ``num_target_keyframes * num_cams`` views. ``segment_to_world`` [4, 4] maps the segment frame to
    the scene's world frame (vehicle-to-world at the segment's first frame).
    """

    key: SegmentKey
    source: Views
    target: Views
    segment_to_world: torch.Tensor
    segment_frames: list[int] = field(default_factory=list)
    lidar: Optional[LidarSweep] = None
    is_new_segment: bool = False

    def to(self, device: torch.device | str) -> "Sample":
        return replace(
            self,
            source=self.source.to(device),
            target=self.target.to(device),
            segment_to_world=self.segment_to_world.to(device),
            lidar=self.lidar.to(device) if self.lidar is not None else None,
        )

    def pin_memory(self) -> "Sample":
        """Source and target views in page-locked host memory (what the model copies each step)."""
        return replace(self, source=self.source.pin_memory(), target=self.target.pin_memory())


@dataclass
class PointCloud:
    """An RGB point cloud of one segment.

    Attributes:
        points: [N, 3] float32 background xyz in the segment frame (metres).
        colors: [N, 3] float32 RGB in [0, 1].
        dynamic: instance id -> (points [M, 3] in object-local box coordinates, colors [M, 3] in [0, 1]).
        tracks: instance id -> its box track over the segment (``evolsplat_ns.data.actors.ActorTrack``:
            object-to-segment poses and validity per frame); same keys as ``dynamic``.
        metadata: free-form provenance (generator name, counts before/after filtering, ...).
        dynamic_frames: instance id -> [M] long, the scene frame whose box placed each of its
            ``dynamic`` points in the object frame (stage 2 re-places them by its fitted poses).
        frame_ids: [N] long, the scene frame that observed each background point (for a point
            averaged from several in a voxel, the earliest of them), or None when unknown. Lets a
            later split (stage 2's flow discovery) move points inside a frame's box to an actor.
    """

    points: torch.Tensor
    colors: torch.Tensor
    dynamic: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tracks: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    dynamic_frames: dict[str, torch.Tensor] = field(default_factory=dict)
    frame_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.points.shape[0]

    def to(self, device: torch.device | str) -> "PointCloud":
        return replace(
            self,
            points=self.points.to(device),
            colors=self.colors.to(device),
            dynamic={k: (p.to(device), c.to(device)) for k, (p, c) in self.dynamic.items()},
            dynamic_frames={k: f.to(device) for k, f in self.dynamic_frames.items()},
            frame_ids=self.frame_ids.to(device) if self.frame_ids is not None else None,
        )

    def as_array(self) -> torch.Tensor:
        """[N, 6] xyz + rgb."""
        return torch.cat([self.points, self.colors], dim=-1)
