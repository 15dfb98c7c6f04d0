"""Back-propagating one target view while the next one is drawn.

A training step renders its targets one by one and back-propagates each before the next
(``EVolSplatModel.sample_loss``): per-target backward, which keeps one target's graph alive at a
time. Around 100k Gaussians per segment the step is bound by the host (docs/performance.md):
while the host walks a target's backward, launching its kernels one by one, the GPU idles, and it
idles again while the host launches the next target's forward. :class:`BackwardLane` runs each
backward on one worker thread while the caller goes on with the next target's forward: the
autograd engine's C++ nodes run without the GIL, so the two threads' launches overlap.

What stays as before: the backwards run one at a time and in submission order, so every gradient
is accumulated in the same order and is bit-for-bit that of the sequential loop; at most one
backward is in flight, so at most two targets' graphs are alive (the one being back-propagated and
the one being drawn). What the caller must keep: the forward that runs beside a backward must not
write in place to anything that backward reads. The step's CUDA graphs (``utils.cuda_graphs``)
replay into static buffers, so consecutive targets replay graphs of different slots
(:func:`~evolsplat_ns.utils.cuda_graphs.graph_slot`), and a capture (which must not see another
thread's kernels) waits for the backward in flight first (:func:`quiesce`).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch

_active: Optional["BackwardLane"] = None
"""The lane the main thread opened (``with BackwardLane(...)``), None outside one."""


class BackwardLane:
    """``backward(loss)`` calls run on a worker thread, one at a time, at most one in flight.

    Use as a context manager around a step's target loop; leaving it waits for the last backward
    (and re-raises its error). ``submit`` waits for the previous backward before it starts the next,
    so the caller's forward of target v+1 runs while target v back-propagates.

    Args:
        backward: called with each submitted loss on the worker thread (e.g.
            ``lambda loss: scaler.scale(loss).backward()``).
    """

    _pool: Optional[ThreadPoolExecutor] = None
    _pool_lock = threading.Lock()

    def __init__(self, backward: Callable[[torch.Tensor], None]) -> None:
        self.backward = backward
        self._pending: Optional[Future] = None
        self._owner: Optional[int] = None

    @classmethod
    def _worker(cls) -> ThreadPoolExecutor:
        """The one worker thread every lane shares (started on first use, kept for the process)."""
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evolsplat-backward")
            return cls._pool

    def __enter__(self) -> "BackwardLane":
        global _active
        if _active is not None:
            raise RuntimeError("a BackwardLane is already open: lanes do not nest")
        self._owner = threading.get_ident()
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        try:
            self.wait()
        finally:
            _active = None

    def submit(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` on the worker once the previous backward has finished."""
        self.wait()
        # The worker issues the backward's seed on the stream the forward ran on (a CUDA thread's
        # current stream is its own, the default one, unless set).
        stream = torch.cuda.current_stream(loss.device) if loss.is_cuda else None
        self._pending = self._worker().submit(self._run, loss, stream)

    def _run(self, loss: torch.Tensor, stream: Optional[torch.cuda.Stream]) -> None:
        if stream is None:
            self.backward(loss)
            return
        with torch.cuda.stream(stream):
            self.backward(loss)

    def wait(self) -> None:
        """Block until the backward in flight (if any) has finished; re-raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def quiesce() -> None:
    """Wait for the open lane's backward in flight, if any, when called from the thread that opened
    the lane (before a CUDA-graph capture, which must not see another thread's kernels, or
    anything else that must not run beside a backward)."""
    lane = _active
    if lane is not None and lane._owner == threading.get_ident():
        lane.wait()
