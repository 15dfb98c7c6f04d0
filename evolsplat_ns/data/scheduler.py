"""Segment scheduler: which training segment each iteration uses, and when it changes.

An *epoch* is one pass over all training segments. The scheduler stays on a segment for
``iters_per_segment`` iterations (so per-segment caches and the recursive offset refinement pay
off), then switches, in sequential or shuffled order. Its state is a few integers plus the numpy
generator state, saved in checkpoints so a resumed run continues the exact same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np


@dataclass
class ScheduleStep:
    segment: int
    """Index into the training segment list."""
    is_new_segment: bool
    """True on the first iteration of a visit to a segment (consumers reset per-segment state)."""
    epoch: int


class SegmentScheduler:
    def __init__(
        self, num_segments: int, iters_per_segment: int = 1,
        order: Literal["sequential", "shuffle"] = "shuffle", seed: int | Sequence[int] = 0,
    ):
        if num_segments <= 0:
            raise ValueError("no training segments: check the data path and the eval split settings")
        if iters_per_segment <= 0:
            raise ValueError(f"iters_per_segment must be >= 1, got {iters_per_segment}")
        if order not in ("sequential", "shuffle"):
            raise ValueError(f"order must be 'sequential' or 'shuffle', got {order!r}")
        self.num_segments = num_segments
        self.iters_per_segment = iters_per_segment
        self.order = order
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.position = 0  # index into the epoch's permutation
        self.iteration_on_segment = 0
        self._perm = self._new_permutation()
        self._current: int | None = None

    def _new_permutation(self) -> list[int]:
        if self.order == "shuffle":
            return self.rng.permutation(self.num_segments).tolist()
        return list(range(self.num_segments))

    def next(self) -> ScheduleStep:
        """Advance one iteration and return the segment to use."""
        if self.iteration_on_segment >= self.iters_per_segment:
            self.iteration_on_segment = 0
            self.position += 1
            if self.position >= self.num_segments:
                self.position = 0
                self.epoch += 1
                self._perm = self._new_permutation()
        seg = self._perm[self.position]
        is_new = self.iteration_on_segment == 0 and seg != self._current
        self._current = seg
        self.iteration_on_segment += 1
        return ScheduleStep(segment=seg, is_new_segment=is_new, epoch=self.epoch)

    def peek_next_segment(self) -> int | None:
        """The segment the next switch goes to (for background preloading); None if not yet drawn."""
        pos = self.position + 1
        if pos < self.num_segments:
            return self._perm[pos]
        return self._perm[0] if self.order == "sequential" else None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "position": self.position, "perm": list(self._perm),
            "iteration_on_segment": self.iteration_on_segment, "current": self._current,
            "rng": self.rng.bit_generator.state, "num_segments": self.num_segments,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_segments"] != self.num_segments:
            raise ValueError(f"checkpoint scheduler has {state['num_segments']} segments but the data "
                             f"now has {self.num_segments}: resume with the same --data and segment settings")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = list(state["perm"])
        self.iteration_on_segment = state["iteration_on_segment"]
        self._current = state["current"]
        self.rng.bit_generator.state = state["rng"]
