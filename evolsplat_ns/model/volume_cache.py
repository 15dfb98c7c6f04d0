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

A segment owns one cache (:class:`evolsplat_ns.model.segment_store.SegmentState`): it is never
persisted, and it goes with the segment (spilled, forgotten, moved to another device).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
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
    pairs: IndexPairs

    def matches(self, sources: Sequence[torch.Tensor], settings: tuple, moving: Sequence[int] = ()) -> bool:
        """True when ``sources`` are the very tensors of this entry under equal settings, unmodified
        but for those at the positions ``moving`` (written in place since, e.g. the offsets)."""
        return (settings == self.settings and len(sources) == len(self.sources)
                and all(a is b and (i in moving or a._version == v)
                        for i, (a, b, v) in enumerate(zip(sources, self.sources, self.versions))))


class VolumeIndexCache:
    """The last voxel grid and index pairs of one segment's sparse volume (see module doc).

    Entries are replaced whole, never modified, so a reader holding one stays consistent.
    """

    def __init__(self) -> None:
        self._entry: Optional[_Entry] = None
        self.hits = 0
        """Builds that reused the entry (statistics, tests)."""
        self.misses = 0
        """Builds that voxelised and built the pairs afresh."""
        self.stale_hits = 0
        """Builds that reused the entry while a ``moving`` source had changed (``refresh_every``)."""
        self._stale_in_a_row = 0

    def __bool__(self) -> bool:
        return self._entry is not None

    @property
    def grid(self) -> Optional[VoxelGrid]:
        """The cached voxel grid (None when empty)."""
        return self._entry.grid if self._entry is not None else None

    def clear(self) -> None:
        """Drop the entry (its device tensors are freed with it)."""
        self._entry = None

    def nbytes(self) -> int:
        """Bytes held by the cached grid and index pairs."""
        if self._entry is None:
            return 0
        g = self._entry.grid
        return self._entry.pairs.nbytes() + sum(t.numel() * t.element_size()
                                                 for t in (g.origin, g.coords, g.keys, g.features))

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
        entry = self._entry
        exact = entry is not None and entry.matches(sources, settings)
        stale = (not exact and entry is not None and self._stale_in_a_row < refresh_every - 1
                 and entry.matches(sources, settings, moving))
        if exact or stale:
            self.hits += exact
            self.stale_hits += stale
            self._stale_in_a_row += stale
            features, _ = net.run(entry.grid, entry.pairs)
            return SparseVolume(entry.grid, features)
        self.misses += 1
        self._stale_in_a_row = 0
        self._entry = None  # the stale pairs are freed before the new ones are built (peak memory)
        grid = voxelize(points, colors(), voxel_size)
        features, pairs = net.run(grid)
        self._entry = _Entry(tuple(sources), tuple(t._version for t in sources), settings, grid, pairs)
        return SparseVolume(grid, features)


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
