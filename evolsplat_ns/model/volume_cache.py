"""Per-segment cache of the sparse volume's voxelisation and spconv index pairs.

Building spconv's index pairs for the U-Net's 7 SubM/strided layers is host-heavy (~18-24 ms of
host time per step on an H200 for ~4 ms of kernels), and they depend on the voxel set alone. When
the volume is voxelised from tensors that did not change since the last step (the anchors with
``volume_from "anchors"``; the anchors and an unchanged offset cache with ``"current"``), the
voxel grid and the pairs are the same, so :class:`VolumeIndexCache` keeps them and only the
convolutions run again.

"Unchanged" is decided without reading the device: the same tensor objects (held by the entry, so
their ids cannot be reused) at the same ``_version`` (bumped by every in-place write), and the same
voxel size and train/eval mode of the net (spconv's implicit-GEMM pairs differ between the two).
With ``refresh_every`` N > 1 (``PredictorConfig.volume_refresh_every``) an entry also serves
builds whose offsets moved, N - 1 times in a row: the volume is then sampled at the current means
from a voxel set up to N - 1 steps old.

A segment owns one cache (:class:`evolsplat_ns.model.segment_store.SegmentState`) and it goes
with the segment. Its voxel set travels in checkpoints and to another device
(:meth:`VolumeIndexCache.state_dict`, :meth:`VolumeIndexCache.to`): with ``refresh_every`` > 1
which builds reuse a stale set depends on that set and on how many builds in a row did, so a
resumed run makes the uninterrupted run's choices only if it starts from the same set. Such an
entry comes back *unbound*: the grid and the count, with which of its sources had moved since it
was built; the next build binds it to the tensors it is given and rebuilds the index pairs from
the grid (deterministic), without voxelising again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import torch
from spconv.pytorch import ops as spconv_ops

from evolsplat_ns.model.sparse_volume import IndexPairs, SparseCostRegNet, SparseVolume, VoxelGrid, voxelize


@dataclass(frozen=True, eq=False)
class _Entry:
    """One cached voxel set: what it was built from, the grid and the U-Net's index pairs."""

    sources: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    settings: tuple
    grid: VoxelGrid
    pairs: Optional[IndexPairs]
    """None until the first build after the entry was bound (rebuilt from ``grid``)."""

    def matches(self, sources: Sequence[torch.Tensor], settings: tuple, moving: Sequence[int] = ()) -> bool:
        """True when ``sources`` are the very tensors of this entry under equal settings, unmodified
        but for those at the positions ``moving`` (written in place since, e.g. the offsets)."""
        return (settings == self.settings and len(sources) == len(self.sources)
                and all(a is b and (i in moving or a._version == v)
                        for i, (a, b, v) in enumerate(zip(sources, self.sources, self.versions))))


@dataclass(frozen=True)
class _Unbound:
    """A voxel set without the tensors it was built from: after a load or a move."""

    grid: VoxelGrid
    settings: tuple
    moved: frozenset[int]
    """Positions of the sources written in place between the build and the unbinding."""
    num_sources: int


class VolumeIndexCache:
    """The last voxel grid and index pairs of one segment's sparse volume (see module doc).

    Entries are replaced whole, never modified, so a reader holding one stays consistent.
    """

    def __init__(self) -> None:
        self._entry: Optional[_Entry] = None
        self._unbound: Optional[_Unbound] = None
        """A voxel set loaded or moved without its sources (bound by the next :meth:`build`)."""
        self._eval: Optional[_Entry] = None
        """The eval-mode net's own entry (exact reuse only, never persisted): renders between
        training steps leave the training entry, and so its refresh schedule, alone."""
        self.hits = 0
        """Builds that reused the entry (statistics, tests)."""
        self.misses = 0
        """Builds that voxelised and built the pairs afresh."""
        self.stale_hits = 0
        """Builds that reused the entry while a ``moving`` source had changed (``refresh_every``)."""
        self._stale_in_a_row = 0

    def __bool__(self) -> bool:
        return self._entry is not None or self._unbound is not None

    @property
    def grid(self) -> Optional[VoxelGrid]:
        """The cached voxel grid (None when empty)."""
        if self._unbound is not None:
            return self._unbound.grid
        return self._entry.grid if self._entry is not None else None

    def clear(self) -> None:
        """Drop the entry (its device tensors are freed with it)."""
        self._entry = self._unbound = self._eval = None
        self._stale_in_a_row = 0

    def nbytes(self) -> int:
        """Bytes held by the cached grid and index pairs."""
        entries = [e for e in (self._entry, self._eval) if e is not None]
        grids = [e.grid for e in entries] + ([self._unbound.grid] if self._unbound is not None else [])
        return sum(g.nbytes() for g in grids) + sum(e.pairs.nbytes() for e in entries if e.pairs is not None)

    def state_dict(self) -> Optional[dict]:
        """The voxel set, its settings, which sources had moved since it was built and the stale
        builds in a row (plain tensors and numbers; checkpoints), or None when empty."""
        unbound = self._unbind()
        if unbound is None:
            return None
        return {"grid": unbound.grid.state_dict(), "settings": list(unbound.settings),
                "moved": sorted(unbound.moved), "num_sources": unbound.num_sources,
                "stale_in_a_row": self._stale_in_a_row}

    def load_state_dict(self, state: Optional[dict], device: torch.device | str = "cpu") -> None:
        """Hold the voxel set of a :meth:`state_dict` on ``device``, unbound (None: empty)."""
        self.clear()
        if state is None:
            return
        self._unbound = _Unbound(VoxelGrid.from_state_dict(state["grid"], device), tuple(state["settings"]),
                                 frozenset(state["moved"]), int(state["num_sources"]))
        self._stale_in_a_row = int(state["stale_in_a_row"])

    def to(self, device: torch.device | str) -> None:
        """Move the voxel set to ``device``, unbound (the sources it was built from move with the
        segment as new tensors; the index pairs are rebuilt there on the next build)."""
        unbound = self._unbind()
        self._entry = self._eval = None
        self._unbound = None if unbound is None else replace(unbound, grid=unbound.grid.to(device))

    def _unbind(self) -> Optional[_Unbound]:
        """The entry without its sources (which of them had moved since it was built kept)."""
        if self._unbound is not None or self._entry is None:
            return self._unbound
        e = self._entry
        moved = frozenset(i for i, (t, v) in enumerate(zip(e.sources, e.versions)) if t._version != v)
        return _Unbound(e.grid, e.settings, moved, len(e.sources))

    def _bind(self, sources: Sequence[torch.Tensor]) -> None:
        """Bind an unbound voxel set to ``sources``: unchanged since, but for those that had moved."""
        u, self._unbound = self._unbound, None
        if u is None or len(sources) != u.num_sources:
            return
        versions = tuple(-1 if i in u.moved else t._version for i, t in enumerate(sources))
        self._entry = _Entry(tuple(sources), versions, u.settings, u.grid, None)

    def build(self, net: SparseCostRegNet, points: torch.Tensor, colors: Callable[[], torch.Tensor],
              voxel_size: float, sources: Sequence[torch.Tensor], moving: Sequence[int] = (),
              refresh_every: int = 1) -> SparseVolume:
        """The sparse volume of ``points`` [N, 3] (segment frame), reusing the entry when it is valid.

        Args:
            net: the U-Net (run every call; only the voxelisation and the pairs are cached).
            points: positions voxelised on a miss (detached).
            colors: returns the [N, 3] point colours; called on a miss only.
            voxel_size: voxel edge (metres).
            sources: the tensors ``points`` and ``colors`` are computed from (e.g. the node's
                means, offset and SH DC): the entry is reused only if these are unchanged.
            moving, refresh_every: the entry is also reused, up to ``refresh_every - 1`` times in
                a row, when only the sources at positions ``moving`` changed (written in place):
                a voxel set up to that many builds old (1: never).
        """
        settings = (float(voxel_size), net.training)
        if not net.training:
            return self._build_eval(net, points, colors, voxel_size, sources, settings)
        if self._unbound is not None:
            self._bind(sources)
        entry = self._entry
        exact = entry is not None and entry.matches(sources, settings)
        stale = (not exact and entry is not None and self._stale_in_a_row < refresh_every - 1
                 and entry.matches(sources, settings, moving))
        if exact or stale:
            self.hits += exact
            self.stale_hits += stale
            self._stale_in_a_row += stale
            features, pairs = net.run(entry.grid, entry.pairs)
            if entry.pairs is None:  # bound after a load or a move: the pairs were built just now
                self._entry = replace(entry, pairs=pairs)
            return SparseVolume(entry.grid, features)
        self.misses += 1
        self._stale_in_a_row = 0
        self._entry = None  # the stale pairs are freed before the new ones are built (peak memory)
        self._entry, volume = _fresh(net, points, colors, voxel_size, sources, settings)
        return volume

    def _build_eval(self, net: SparseCostRegNet, points: torch.Tensor, colors: Callable[[], torch.Tensor],
                    voxel_size: float, sources: Sequence[torch.Tensor], settings: tuple) -> SparseVolume:
        """:meth:`build` for the eval-mode net, from its own entry, reused only while unchanged."""
        entry = self._eval
        if entry is not None and entry.matches(sources, settings):
            self.hits += 1
            features, _ = net.run(entry.grid, entry.pairs)
            return SparseVolume(entry.grid, features)
        self.misses += 1
        self._eval = None
        self._eval, volume = _fresh(net, points, colors, voxel_size, sources, settings)
        return volume


def _fresh(net: SparseCostRegNet, points: torch.Tensor, colors: Callable[[], torch.Tensor], voxel_size: float,
           sources: Sequence[torch.Tensor], settings: tuple) -> tuple[_Entry, SparseVolume]:
    """Voxelise ``points`` and run ``net`` building the index pairs: the entry and the volume."""
    grid = voxelize(points, colors(), voxel_size)
    features, pairs = net.run(grid)
    return _Entry(tuple(sources), tuple(t._version for t in sources), settings, grid, pairs), SparseVolume(grid, features)


@contextmanager
def counted_pair_builds() -> Iterator[list[int]]:
    """Counts spconv's index-pair constructions (native and implicit-GEMM) in the block, in
    ``count[0]`` (benchmarks, tests): spconv's layers call them through the ``ops`` module."""
    count = [0]
    names = ("get_indice_pairs", "get_indice_pairs_implicit_gemm")
    originals = {name: getattr(spconv_ops, name) for name in names}

    def counting(fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(spconv_ops, name, counting(fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(spconv_ops, name, fn)
