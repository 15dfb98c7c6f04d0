"""Wall-clock timing of named stages, correct on CUDA (kernels are asynchronous)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


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
