"""The one owner of per-segment state: node + offset cache, frozen volume, render caches.

A multi-scene run visits hundreds of segments (a Waymo training set has ~800). Each segment's
:class:`SegmentState` lives here and nowhere else. The store keeps at most ``max_resident_mb`` of
them in host memory (least recently used first out) and spills the rest to ``spill_dir`` (under the
run folder during training), reading a spilled segment back the next time it is asked for. The
segment being shown/trained (``active``) is pinned: it is never spilled and is the only one on the
model's device. A checkpoint holds every segment, resident or spilled (:meth:`state_dict`).

Everything is in the **segment frame** (vehicle frame at the segment's first frame).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from evolsplat_ns.data.types import SegmentKey
from evolsplat_ns.model.actors import ActorNodes
from evolsplat_ns.model.node import GaussianNode, GaussianParams
from evolsplat_ns.model.sparse_volume import SparseVolume
from evolsplat_ns.model.stage2.processor import ObservedMotion
from evolsplat_ns.model.state_cache import EncodedStateCache
from evolsplat_ns.model.volume_cache import VolumeIndexCache


@dataclass
class SegmentState:
    """What the model keeps for one segment.

    Attributes:
        node: anchor Gaussians and their offset cache (persisted).
        actors: the segment's moving actors, object-frame anchors + box tracks (persisted; None without).
        frozen_volume: the detached sparse volume when ``freeze_volume`` (persisted).
        motion: stage 2's observed motion of the actors (the processor's per-segment cache; persisted;
            None until stage 2 processed the segment). ``actors.poses`` then hold the fitted poses and
            ``motion.box_poses`` the boxes as the data gave them.
        encoded: encoded states of chosen sources for bare-camera renders (never persisted;
            cleared whenever the segment becomes active, so weights that changed are not served stale).
        snapshot: (model step, Gaussians) for exporters (never persisted; cleared likewise).
        volume_cache: the sparse volume's voxel grid and spconv index pairs, reused while the points
            it was built from are unchanged (the voxel set is persisted and moves with the node, so
            a resumed run, or one visiting segments in another order, reuses what the uninterrupted
            one would).
    """

    node: GaussianNode
    actors: Optional[ActorNodes] = None
    frozen_volume: Optional[SparseVolume] = None
    motion: Optional[ObservedMotion] = None
    encoded: EncodedStateCache = field(default_factory=EncodedStateCache, repr=False)
    snapshot: Optional[tuple[int, GaussianParams]] = field(default=None, repr=False)
    volume_cache: VolumeIndexCache = field(default_factory=VolumeIndexCache, repr=False)

    def clear_render_caches(self) -> None:
        self.encoded = EncodedStateCache(self.encoded.capacity)
        self.snapshot = None

    def to(self, device: torch.device | str) -> "SegmentState":
        """Move the persisted tensors to ``device`` in place (render caches are dropped; if the node
        moved, the volume cache's voxel set moves with it, unbound); returns self."""
        means = self.node.means
        self.node.to(device)
        if self.node.means is not means:  # moved: the cache's sources are the old device's tensors
            self.volume_cache.to(device)
        if self.actors is not None:
            self.actors.to(device)
        if self.frozen_volume is not None:
            self.frozen_volume = self.frozen_volume.to(device)
        if self.motion is not None:
            self.motion.to(device)
        self.clear_render_caches()
        return self

    def nbytes(self) -> int:
        return (self.node.nbytes() + (self.actors.nbytes() if self.actors is not None else 0)
                + (self.frozen_volume.nbytes() if self.frozen_volume is not None else 0)
                + (self.motion.nbytes() if self.motion is not None else 0) + self.volume_cache.nbytes())

    def state_dict(self) -> dict:
        return {"node": self.node.state_dict(),
                "actors": self.actors.state_dict() if self.actors is not None else None,
                "frozen_volume": self.frozen_volume.state_dict() if self.frozen_volume is not None else None,
                "motion": self.motion.state_dict() if self.motion is not None else None,
                "volume_cache": self.volume_cache.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SegmentState":
        volume, actors, motion = state.get("frozen_volume"), state.get("actors"), state.get("motion")
        segment = cls(GaussianNode.from_state_dict(state["node"]),
                      ActorNodes.from_state_dict(actors) if actors is not None else None,
                      SparseVolume.from_state_dict(volume) if volume is not None else None,
                      ObservedMotion.from_state_dict(motion) if motion is not None else None)
        segment.volume_cache.load_state_dict(state.get("volume_cache"))  # absent in older checkpoints
        return segment


class SegmentStore:
    """Segment key -> :class:`SegmentState`, bounded in host memory, spilling to disk.

    The bound is enforced at every :meth:`put` and :meth:`activate` (the active segment is exempt).

    Args:
        max_resident_mb: host-memory bound for the states of inactive segments (0 = unbounded).
        spill_dir: folder for spilled states (created on first spill). None = a private temporary
            folder, removed with the store.
    """

    def __init__(self, max_resident_mb: float = 0.0, spill_dir: Optional[Path] = None) -> None:
        self.max_resident_bytes = int(max_resident_mb * 2**20)
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._resident: OrderedDict[SegmentKey, SegmentState] = OrderedDict()
        self._spilled: dict[SegmentKey, Path] = {}
        self.active: Optional[SegmentKey] = None
        self.spills = 0
        """How many times a state was written out (statistics, tests)."""

    # -- lookup --------------------------------------------------------------------------------

    def __contains__(self, key: SegmentKey) -> bool:
        return key in self._resident or key in self._spilled

    def __len__(self) -> int:
        return len(self._resident) + len(self._spilled)

    def keys(self) -> list[SegmentKey]:
        """Every stored segment, resident ones first (least recently used first)."""
        return list(self._resident) + list(self._spilled)

    def resident_keys(self) -> list[SegmentKey]:
        return list(self._resident)

    def get(self, key: SegmentKey) -> Optional[SegmentState]:
        """The state of ``key`` (read back from disk if spilled), now most recently used; or None."""
        if key in self._spilled:  # the bound is enforced at the next put or activate, not here
            path = self._spilled.pop(key)
            self._resident[key] = SegmentState.from_state_dict(torch.load(path, map_location="cpu"))
            path.unlink(missing_ok=True)
        state = self._resident.get(key)
        if state is not None:
            self._resident.move_to_end(key)
        return state

    def put(self, key: SegmentKey, state: SegmentState) -> SegmentState:
        """Store ``state`` under ``key`` (replacing any); returns it."""
        self._spilled.pop(key, None)
        self._resident[key] = state
        self._resident.move_to_end(key)
        self._enforce_bound()
        return state

    def activate(self, key: SegmentKey, device: torch.device | str) -> SegmentState:
        """Make ``key`` the pinned segment on ``device`` (the previous active one goes back to host
        memory); its render caches start empty. ``key`` must be stored."""
        if self.active is not None and self.active != key and self.active in self._resident:
            previous = self._resident[self.active]
            previous.to("cpu")  # its voxel set too: a segment's refreshes do not depend on what ran between
        state = self.get(key)
        if state is None:
            raise KeyError(f"segment {key} is not in the store")
        self.active = key
        self._enforce_bound()
        return state.to(device)

    def resident_bytes(self, include_active: bool = False) -> int:
        """Host bytes held by resident states (the active one only if asked)."""
        return sum(s.nbytes() for k, s in self._resident.items() if include_active or k != self.active)

    # -- bound and spill -----------------------------------------------------------------------

    def spill_dir(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="evolsplat-segments-"))
            weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        return self._spill_dir

    def set_spill_dir(self, folder: Path) -> None:
        """Spill into ``folder`` from now on (states spilled earlier stay where they are)."""
        self._spill_dir = Path(folder)

    def _enforce_bound(self) -> None:
        if self.max_resident_bytes <= 0:
            return
        while self.resident_bytes() > self.max_resident_bytes:
            victim = next((k for k in self._resident if k != self.active), None)
            if victim is None:
                return
            self._spill(victim)

    def _spill(self, key: SegmentKey) -> None:
        folder = self.spill_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key.scene}_seg{key.segment:03d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self._resident[key].state_dict(), tmp)
        tmp.replace(path)  # a crash mid-write never leaves a truncated spill file under the real name
        del self._resident[key]
        self._spilled[key] = path
        self.spills += 1

    # -- whole-store operations ----------------------------------------------------------------

    def items_state(self) -> Iterator[tuple[SegmentKey, dict]]:
        """(key, state dict) of every segment, spilled ones read from disk one at a time."""
        for key, state in self._resident.items():
            yield key, state.state_dict()
        for key, path in self._spilled.items():
            yield key, torch.load(path, map_location="cpu")

    def state_dict(self) -> dict[str, dict]:
        """Every segment (resident and spilled), keyed by ``str(SegmentKey)`` (checkpoints)."""
        return {str(key): state for key, state in self.items_state()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Replace the store's content with a :meth:`state_dict` (the bound applies as they arrive)."""
        self.forget()
        for key, s in state.items():
            self.put(SegmentKey.parse(key), SegmentState.from_state_dict(s))

    def forget(self) -> None:
        """Drop every segment, resident and spilled (their spill files are deleted)."""
        for path in self._spilled.values():
            path.unlink(missing_ok=True)
        self._resident.clear()
        self._spilled.clear()
        self.active = None
