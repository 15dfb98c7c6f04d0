"""Per-segment sensor observations for stage 2: depth, optical flow and images, loaded lazily.

The online stage-2 processor (:mod:`evolsplat_ns.model.stage2.processor`) estimates how each moving
object moved between consecutive frames from optical flow and depth. It needs every frame pair of
a segment, not just a training sample's few keyframes, so this module gives it a lazy view of the
segment: nothing is read until a pair is asked for, and nothing is kept afterwards (the processor
keeps only its small per-object results).

Frames: poses are OpenCV camera-to-segment (the segment frame is the vehicle frame at the segment's
first frame), as in every :class:`~evolsplat_ns.data.types.Sample`. Flow is the dataset's
``flow/{t:03d}_{cam}.npy`` (pixels, t -> t+1, same camera; a real observation where the dataset
provides it), depth ``depth/{t:03d}_{cam}.npy`` (OpenCV z in metres, 0 = unknown).

Honesty rules: only the segment's own (context) frames and cameras are offered, so held-out frames
and a held-out camera never feed stage 2; a pair (t, t + 1) is offered only when both frames are
in the segment (flow is defined between consecutive scene frames only).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Optional, Sequence, TypeVar

import numpy as np
import torch

from evolsplat_ns.data.scene import SceneData


@dataclass
class ViewObservation:
    """One camera at one frame. K [3, 3] pixels; c2w [4, 4] OpenCV camera-to-segment; depth [H, W]
    (0 = unknown) or None; image [H, W, 3] in [0, 1] or None (only when asked for)."""

    frame: int
    cam: int
    K: torch.Tensor
    c2w: torch.Tensor
    depth: Optional[torch.Tensor]
    image: Optional[torch.Tensor] = None


@dataclass
class PairObservation:
    """One camera between frames t and t + 1: both views and the flow t -> t+1 [H, W, 2] (pixels,
    dx right, dy down) from the dataset, or None where the dataset has no ``flow/``."""

    view_t: ViewObservation
    view_t1: ViewObservation
    flow: Optional[torch.Tensor]


class SegmentObservations:
    """Lazy per-pair access to one segment's depth, flow and images.

    Args:
        scene: the segment's scene (calibrated at the training image size).
        frames: the segment's context frames (ascending scene frame indices).
        cameras: its cameras (a held-out camera already removed).
        seg_from_world: [4, 4] world -> segment frame (float64).
    """

    def __init__(self, scene: SceneData, frames: Sequence[int], cameras: Sequence[int],
                 seg_from_world: np.ndarray) -> None:
        self.scene, self.frames, self.cameras = scene, [int(t) for t in frames], [int(c) for c in cameras]
        self.seg_from_world = np.asarray(seg_from_world, dtype=np.float64)
        self.has_flow = scene.layout.has("flow")
        self.has_depth = scene.layout.has("depth")

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of every view."""
        return self.scene.common_size

    def pairs(self) -> list[tuple[int, int]]:
        """Consecutive (t, t + 1) frame pairs inside the segment."""
        present = set(self.frames)
        return [(t, t + 1) for t in self.frames if t + 1 in present]

    def view(self, t: int, cam: int, image: bool = False, depth: bool = True) -> ViewObservation:
        """Camera ``cam`` at frame ``t``; ``depth=False`` skips reading its depth map (None then)."""
        c2w = torch.from_numpy(self.seg_from_world @ self.scene.cam_to_world(t, cam)).float()
        K = torch.from_numpy(self.scene.calib[cam].K).float()
        depth = self.scene._load_depth(t, cam, self.size) if self.has_depth and depth else None
        img = self.scene.load_view_pairs([(t, cam)], self.seg_from_world).images[0] if image else None
        return ViewObservation(t, cam, K, c2w, depth, img)

    def pair(self, t: int, cam: int, images: bool = False, depth: bool = True) -> PairObservation:
        """Camera ``cam`` between frames ``t`` and ``t + 1`` (both must be in the segment);
        ``depth=False`` reads no depth maps (the per-step consistency term needs only the flow)."""
        if t not in self.frames or t + 1 not in self.frames:
            raise ValueError(f"frames {t}, {t + 1} are not both in this segment ({self.frames})")
        flow = self.scene.load_flow(t, cam, self.size) if self.has_flow else None
        return PairObservation(self.view(t, cam, images, depth), self.view(t + 1, cam, images, depth), flow)


T = TypeVar("T")


class FlowCache(Generic[T]):
    """A small LRU of per-view flow entries bounded in bytes (``max_bytes``; 0 = keep nothing).

    Stage 2's consistency term reads the flow of every target view on every stage-2 step; the model
    keeps the views of the segments it trains here (keyed by (segment, frame, camera), already
    resized to the render size and on its device), so steady-state steps read no file. ``get``
    builds a missing entry with ``load() -> (entry, nbytes)``; entries larger than the bound are
    returned without being kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable, load: Callable[[], tuple[T, int]]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        self.misses += 1
        entry, size = load()
        if size <= self.max_bytes:
            self._items[key] = (entry, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.nbytes -= dropped
        return entry

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
