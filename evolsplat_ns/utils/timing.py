"""Opt-in per-phase timers for benchmarks (no cost and no CUDA syncs unless enabled).

Model code marks phases with ``with phase("render"):``. ``benchmarks/train_throughput.py`` enables
the timers, which then synchronise CUDA at phase boundaries so each phase's time is its own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def phase(name: str) -> Iterator[None]:
    if not _enabled:
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
