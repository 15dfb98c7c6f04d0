"""Learning-rate schedule whose state is plain Python floats.

nerfstudio's ``ExponentialDecayScheduler`` returns numpy floats; they end up in the optimizer and
scheduler state, and torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses numpy
scalars: ``ns-eval`` / ``--load-dir`` then fail on every checkpoint. Same schedule, float math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Type

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from torch.optim import Optimizer, lr_scheduler


@dataclass
class FloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    _target: Type = field(default_factory=lambda: FloatExponentialDecayScheduler)


class FloatExponentialDecayScheduler(ExponentialDecayScheduler):
    config: FloatExponentialDecaySchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        c = self.config
        lr_final = lr_init if c.lr_final is None else c.lr_final

        def factor(step: int) -> float:
            if step < c.warmup_steps:
                ramp = min(max(step / c.warmup_steps, 0.0), 1.0)
                if c.ramp == "cosine":
                    ramp = math.sin(0.5 * math.pi * ramp)
                lr = c.lr_pre_warmup + (lr_init - c.lr_pre_warmup) * ramp
            else:
                t = min(max((step - c.warmup_steps) / max(c.max_steps - c.warmup_steps, 1), 0.0), 1.0)
                lr = math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)
            return float(lr / lr_init)

        return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
