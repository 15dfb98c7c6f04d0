"""Reuse of the predictor's encoded shared state between viewer frames.

``GaussianPredictor.encode`` (sparse volume, volume features, offsets, source-view windows, sky
dome) is the expensive part of a render and depends only on the segment and the chosen source
views, not on the target camera. While the viewer camera moves, the nearest sources usually stay
the same, so a frame only needs ``predict`` + rasterisation. :class:`EncodedStateCache` keeps the
last few encoded states of one segment context; a new context (every ``set_context``, hence every
training step) starts with an empty one, so weights or offsets that changed are never served stale.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional

from evolsplat_ns.model.predictor import SharedState
from evolsplat_ns.model.projector import Projector


class EncodedStateCache:
    """LRU map from a key (e.g. model step, source count, chosen source indices) to a SharedState.

    Only for inference (states built under ``torch.no_grad()``): a cached state carries no graph.
    """

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"EncodedStateCache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._states: OrderedDict[Hashable, SharedState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def get_or_build(self, key: Hashable, build: Callable[[], SharedState]) -> SharedState:
        """The state stored under ``key``, or ``build()``'s result (stored, evicting the oldest)."""
        if key in self._states:
            self.hits += 1
            self._states.move_to_end(key)
            return self._states[key]
        self.misses += 1
        state = build()
        self._states[key] = state
        if len(self._states) > self.capacity:
            self._states.popitem(last=False)
        return state

    def clear(self) -> None:
        self._states.clear()


@contextmanager
def neighbour_count(projector: Projector, count: Optional[int]) -> Iterator[None]:
    """Temporarily make ``projector`` pick ``count`` nearest source views (None = leave as is).

    The projector's count is read both when choosing sources to encode and again inside
    ``predict``; overriding it for the duration of one render keeps both consistent without
    touching the configured value used by training.
    """
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"the number of source views must be >= 1, got {count}")
    saved = projector.num_neighbour_select
    projector.num_neighbour_select = count
    try:
        yield
    finally:
        projector.num_neighbour_select = saved
