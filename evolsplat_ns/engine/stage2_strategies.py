"""Stage-2 controllers beyond the default schedule (the user guide's advanced examples).

A controller is an :class:`~evolsplat_ns.engine.stage2.OnlineStage2Trainer` subclass, selected by
name with ``--pipeline.model.stage2.stage2-controller NAME``. Built in:

- ``default``: the fixed schedule (``start_step`` / ``stage2_start_epoch``, every ``stage2_frequency``);
- ``memory_adaptive`` (:class:`MemoryAdaptiveStage2Trainer`): runs stage 2 less often while the
  device's memory use is high, and back at the configured frequency once it is low again;
- ``epoch_phases`` (:class:`EpochPhasedStage2Trainer`): a table of epochs at which stage 2 is turned
  on, its mode switches (e.g. ``gaussian_only`` -> ``joint``) and its frequency changes.

Your own: subclass, then :func:`register_controller` it before training (e.g. in a plugin's
import), and name it in the config. ``functools.partial`` binds constructor arguments::

    register_controller("my_phases", functools.partial(EpochPhasedStage2Trainer, phases=[
        Phase(epoch=0, enabled=False), Phase(epoch=5, mode="gaussian_only", frequency=5),
        Phase(epoch=20, mode="joint", frequency=2)]))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from evolsplat_ns.engine.stage2 import OnlineStage2Trainer
from evolsplat_ns.model.stage2.config import Stage2Mode


def cuda_memory_fraction() -> float:
    """Allocated / total memory of the current CUDA device (0.0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0.0
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return torch.cuda.memory_allocated() / total


class MemoryAdaptiveStage2Trainer(OnlineStage2Trainer):
    """Stage 2 every ``stage2_frequency`` steps while memory use is below ``high``; above it the
    interval doubles (up to ``max_frequency``), and it halves back once use falls below ``low``.

    Args (beyond the controller's): memory: a function returning the memory fraction in use
    (default :func:`cuda_memory_fraction`; tests script it); high / low: the thresholds.
    """

    def __init__(self, *args, memory: Callable[[], float] = cuda_memory_fraction, high: float = 0.85,
                 low: float = 0.6, max_frequency: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.memory, self.high, self.low, self.max_frequency = memory, high, low, max_frequency
        self.base_frequency = self.frequency = self.config.stage2_frequency
        self._last_run: Optional[int] = None

    def should_run(self, epoch: int, step: int) -> bool:
        if not self.has_started(epoch, step):
            return False
        used = self.memory()
        if used > self.high:
            self.frequency = min(self.max_frequency, self.frequency * 2)
        elif used < self.low:
            self.frequency = max(self.base_frequency, self.frequency // 2)
        due = self._last_run is None or step - self._last_run >= self.frequency
        if due:
            self._last_run = step
        return due

    def get_statistics(self) -> dict:
        return {**super().get_statistics(), "frequency": self.frequency}


@dataclass
class Phase:
    """From ``epoch`` on: stage 2 ``enabled`` or not, in ``mode`` at ``frequency`` (None: unchanged)."""

    epoch: int
    enabled: bool = True
    mode: Optional[Stage2Mode] = None
    frequency: Optional[int] = None


DEFAULT_PHASES = (Phase(0, enabled=False), Phase(2, mode="gaussian_only", frequency=5), Phase(4, mode="joint", frequency=2))
"""The guide's multi-stage example: stage 1 alone, then Gaussians only, then both heads more often."""


class EpochPhasedStage2Trainer(OnlineStage2Trainer):
    """Applies the phase of the current epoch (the last with ``epoch <=`` it) before each step: on/off,
    mode (the frozen head leaves the optimizer, :meth:`set_training_mode`) and frequency. Runs
    every ``frequency`` steps from the phase's first step. ``stage2_start_epoch`` / ``start_step``
    are not used: the phases decide."""

    def __init__(self, *args, phases: Sequence[Phase] = DEFAULT_PHASES, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phases = sorted(phases, key=lambda p: p.epoch)
        self.phase: Optional[Phase] = None
        self._phase_start = 0

    def phase_at(self, epoch: int) -> Optional[Phase]:
        current = [p for p in self.phases if p.epoch <= epoch]
        return current[-1] if current else None

    def has_started(self, epoch: int, step: int) -> bool:
        phase = self.phase_at(epoch)
        return phase is not None and phase.enabled

    def should_run(self, epoch: int, step: int) -> bool:
        phase = self.phase_at(epoch)
        if phase is not self.phase:
            self._enter(phase, step)
        return self.has_started(epoch, step) and (step - self._phase_start) % self.config.stage2_frequency == 0

    def _enter(self, phase: Optional[Phase], step: int) -> None:
        self.phase, self._phase_start = phase, step
        if phase is None:
            return
        if phase.frequency is not None:
            self.config = replace(self.config, stage2_frequency=phase.frequency)
        if phase.mode is not None and self.model is not None and phase.mode != self.model.stage2.mode:
            self.set_training_mode(phase.mode)


_CONTROLLERS: dict[str, Callable[..., OnlineStage2Trainer]] = {
    "default": OnlineStage2Trainer,
    "memory_adaptive": MemoryAdaptiveStage2Trainer,
    "epoch_phases": EpochPhasedStage2Trainer,
}


def register_controller(name: str, factory: Callable[..., OnlineStage2Trainer]) -> None:
    """Make ``factory(config, model, optimizers, steps_per_epoch)`` selectable as ``stage2_controller = name``."""
    _CONTROLLERS[name] = factory


def make_controller(name: str, *args, **kwargs) -> OnlineStage2Trainer:
    """The controller named ``name`` (``stage2_controller``), built with the controller's arguments."""
    if name not in _CONTROLLERS:
        raise ValueError(f"stage2_controller={name!r} is not registered; available: {sorted(_CONTROLLERS)} "
                         "(register_controller in evolsplat_ns.engine.stage2_strategies adds your own)")
    return _CONTROLLERS[name](*args, **kwargs)
