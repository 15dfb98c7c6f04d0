"""A host read of "were these losses finite?" that waits for the losses, not for the work after them.

A training step back-propagates each target's loss right after computing it, so by the time the
trainer asks whether the step's loss was finite, the device still has the last target's backward
and the shared backward queued (at 1M Gaussians ~5 ms of kernels). ``bool(torch.isfinite(total))``
waits for all of it, the device then idles while the host starts the next step (the optimizer
launch, the sparse U-Net's host-heavy layers). :class:`FiniteFlags` instead reads the losses'
finiteness on a side stream that waits for the step's stream only up to the last noted loss.
"""

from __future__ import annotations

from typing import Optional

import torch


_READ_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _read_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream per device for the flag reads (created once, outside any capture)."""
    if device not in _READ_STREAMS:
        _READ_STREAMS[device] = torch.cuda.Stream(device)
    return _READ_STREAMS[device]


class FiniteFlags:
    """Finiteness of the losses noted so far, readable on the host without waiting for later work.

    ``note(loss)`` (call it before launching the loss's backward) folds ``isfinite(loss)`` into one
    device flag and makes a side stream wait for the current stream at that point;
    ``all_finite()`` copies the flag to the host on the side stream, so the read waits for the
    device to pass the last note and not for what was queued after it. No pinned memory and no
    events outlive a note: the CUDA graphs captured later in the step must not see host-allocator
    events (a pinned block freed during a capture records one and invalidates the capture).
    On the CPU the flag is a plain tensor (a read costs nothing there).
    """

    def __init__(self) -> None:
        self._ok: Optional[torch.Tensor] = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def note(self, loss: torch.Tensor) -> None:
        """Record whether ``loss`` (a scalar or any tensor: every element counts) is finite."""
        ok = torch.isfinite(loss.detach()).all()
        self._ok = ok if self._ok is None else self._ok & ok
        self._count += 1
        if ok.is_cuda:
            _read_stream(ok.device).wait_stream(torch.cuda.current_stream(ok.device))

    def all_finite(self) -> bool:
        """Whether every noted loss was finite (True when none was noted)."""
        if self._ok is None:
            return True
        if not self._ok.is_cuda:
            return bool(self._ok)
        with torch.cuda.stream(_read_stream(self._ok.device)):
            return bool(self._ok.cpu())
