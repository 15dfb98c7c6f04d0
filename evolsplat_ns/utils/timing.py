"""Timers: opt-in per-phase totals for benchmarks (``phase``) and per-stage samples (``StageTimer``).

Phase timers cost nothing and sync no CUDA stream unless enabled.

Model code marks phases with ``with phase("render"):``. ``benchmarks/train_throughput.py`` enables
the timers, which then synchronise CUDA at phase boundaries so each phase's time is its own.
Under ``torch.profiler`` (timers off) a phase is a ``record_function`` range named ``phase:<name>``,
so the profile can say which phase's host work the GPU waited on (``benchmarks/train_throughput.py``'s ``idle_by_phase``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

_enabled = False
_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def reset() -> None:
    _totals.clear()
    _counts.clear()


def totals() -> dict[str, float]:
    """Seconds accumulated per phase since the last :func:`reset`."""
    return dict(_totals)


PHASE_PREFIX = "phase:"
"""Prefix of the profiler ranges :func:`phase` records while a profiler runs."""


@contextmanager
def phase(name: str) -> Iterator[None]:
    if not _enabled:
        if torch._C._autograd._profiler_enabled():
            with torch.profiler.record_function(PHASE_PREFIX + name):
                yield
        else:
            yield
        return
    sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize()
        _totals[name] += time.perf_counter() - t0
        _counts[name] += 1


class StageTimer:
    """Collects durations in milliseconds per stage name.

    On CUDA every measurement is bracketed by ``torch.cuda.synchronize()``, so it covers the
    kernels the stage launched rather than just their launch.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.samples: dict[str, list[float]] = defaultdict(list)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.samples[stage].append((time.perf_counter() - start) * 1e3)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: mean, median (robust to the first call's warm-up), min, max (ms) and count."""
        return {stage: {"mean_ms": float(np.mean(v)), "median_ms": float(np.median(v)),
                        "min_ms": float(np.min(v)), "max_ms": float(np.max(v)), "count": len(v)}
                for stage, v in self.samples.items()}
