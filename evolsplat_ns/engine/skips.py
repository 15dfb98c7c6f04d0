"""A limit on skipped training steps: a run that mostly skips stops instead of "finishing".

The trainer skips a step that cannot train (empty segment, no visible Gaussian, non-finite loss,
CUDA OOM) and goes on; one such segment must not kill a long run. But a run skipping a large
share of its steps is broken (bad data, bad settings) and must not exit 0 as if it trained.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch

from evolsplat_ns.utils.errors import UserError


class SkipLimitError(UserError):
    """Too many recent steps were skipped; the message gives the counts by reason and the setting."""


class SkipLimit:
    """Stops a run when more than ``max_fraction`` of the last ``window`` steps were skipped.

    Counted against ``window`` from the first step on, so a run whose first steps all skip stops
    after ``floor(max_fraction * window) + 1`` of them rather than after a whole window.
    ``max_fraction >= 1`` disables the limit.
    """

    def __init__(self, max_fraction: float, window: int):
        if window < 1:
            raise ValueError(f"skip window must be >= 1 step, got {window}")
        self.max_fraction = max_fraction
        self.window = window
        self._recent: deque[tuple[int, str]] = deque()

    def record(self, step: int, reason: str) -> None:
        """Note that ``step`` was skipped for ``reason``; SkipLimitError once over the limit."""
        self._recent.append((step, reason))
        while self._recent and self._recent[0][0] <= step - self.window:
            self._recent.popleft()
        if self.max_fraction < 1 and len(self._recent) > self.max_fraction * self.window:
            reasons: dict[str, int] = {}
            for _, r in self._recent:
                reasons[r] = reasons.get(r, 0) + 1
            counts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            raise SkipLimitError(
                f"stopping at step {step}: {len(self._recent)} of the last {self.window} steps were skipped "
                f"({counts}), more than max_skipped_fraction={self.max_fraction:g}; check the data "
                f"(evolsplat-data inspect --full) or raise --max-skipped-fraction (1 = no limit)")


class DeferredNonfinite:
    """A step's non-finite-loss skip taken on the device, and read on the host one step later.

    Reading ``isfinite(loss)`` right after the step's backward waits for the whole backward queue;
    the device then idles while the host starts the next step. Instead :meth:`flag` gives the
    device flag (bool [], True = skip) from which fused Adam skips its update (``found_inf``:
    parameters, moments and step count untouched) and the cached offsets are kept, and
    :meth:`take` reads it during the next step, after the device has long passed it.
    """

    def __init__(self) -> None:
        self._pending: Optional[tuple[int, str, torch.Tensor, torch.Tensor]] = None

    def flag(self, step: int, segment: str, loss: torch.Tensor) -> torch.Tensor:
        """The skip flag of ``step`` from its total ``loss`` (a device scalar); noted for :meth:`take`."""
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        self._pending = (step, segment, loss, bad)
        return bad

    def take(self) -> Optional[tuple[int, str]]:
        """(step, message) of the noted step if its loss was non-finite, else None; forgets it.
        A host read of the flag (cheap once the device has passed that step)."""
        if self._pending is None:
            return None
        step, segment, loss, bad = self._pending
        self._pending = None
        if not bool(bad):
            return None
        return step, f"non-finite loss {float(loss)} on segment {segment}; its optimizer step was skipped on the device"
