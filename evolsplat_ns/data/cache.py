"""Memory-bounded LRU caches: per-segment point clouds (with background preloading) and decoded images.

Building a segment's RGB point cloud (reading LiDAR, colouring, filtering) takes long enough that
training should not wait for it on every segment switch: ``preload(key)`` builds the next segment
in a worker thread while the current one trains, and ``get(key)`` returns it (waiting only if the
build is still running). The bound is on bytes of tensors held, evicting least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable

import numpy as np

from evolsplat_ns.data.types import PointCloud


def point_cloud_nbytes(pc: PointCloud) -> int:
    n = pc.points.nbytes + pc.colors.nbytes + (pc.frame_ids.nbytes if pc.frame_ids is not None else 0)
    return n + sum(p.nbytes + c.nbytes for p, c in pc.dynamic.values())


class PointCloudCache:
    """LRU of ``key -> PointCloud`` bounded by ``max_bytes`` (0 = unbounded).

    Args:
        build: ``key -> PointCloud``; called at most once per key while it stays cached.
        max_bytes: memory bound; the most recently used entry is always kept even if larger.
        preload: whether :meth:`preload` builds in a background thread (else it is a no-op).
    """

    def __init__(self, build: Callable[[Hashable], PointCloud], max_bytes: int = 0, preload: bool = True):
        self._build = build
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, PointCloud] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pc-preload") if preload else None
        self.hits = self.misses = self.builds = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(point_cloud_nbytes(pc) for pc in self._entries.values())

    def get(self, key: Hashable) -> PointCloud:
        """The point cloud of ``key``: cached, finished by a preload, or built now."""
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
            fut = self._pending.pop(key, None)
        self.misses += 1
        pc = fut.result() if fut is not None else self._counted_build(key)
        self._insert(key, pc)
        return pc

    def preload(self, key: Hashable) -> None:
        """Start building ``key`` in the background unless cached or already pending."""
        if self._pool is None:
            return
        with self._lock:
            if key in self._entries or key in self._pending:
                return
            self._pending[key] = self._pool.submit(self._counted_build, key)

    def _counted_build(self, key: Hashable) -> PointCloud:
        self.builds += 1
        return self._build(key)

    def _insert(self, key: Hashable, pc: PointCloud) -> None:
        with self._lock:
            self._entries[key] = pc
            self._entries.move_to_end(key)
            while self.max_bytes > 0 and len(self._entries) > 1 and self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class ImageCache:
    """Decoded images by key, least recently used dropped beyond ``max_bytes``; thread-safe.

    A segment's training samples draw their source and target frames from the same few frames,
    so caching the decoded arrays takes the JPEG decode (and PIL's GIL-holding array conversion)
    off every sample after the first few. Arrays are returned read-only and shared: callers copy
    (``np.stack``) rather than write into them.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"ImageCache needs max_bytes > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get_or_load(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The array cached under ``key``, else ``load()`` (run outside the lock, so decoder
        threads load in parallel) cached and returned."""
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
        array = load()
        array.setflags(write=False)
        with self._lock:
            self.misses += 1
            if key not in self._entries:
                self._entries[key] = array
                self._nbytes += array.nbytes
            while len(self._entries) > 1 and self._nbytes > self.max_bytes:
                self._nbytes -= self._entries.popitem(last=False)[1].nbytes
        return array
