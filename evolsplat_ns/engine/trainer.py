"""EVolSplat's training step as a nerfstudio ``Trainer``.

One iteration: zero grads; fetch a sample; the model's one loss loop (``EVolSplatModel.sample_loss``)
makes its segment the context, runs the shared feature extraction once (sparse volume, 2D window
sampling), then for each target view predicts Gaussians, renders foreground + background and
back-propagates ``loss_v / num_targets`` without ``retain_graph`` (each target's graph freed before
the next), then the shared part once; clip (nerfstudio unscales first under AMP); one optimizer step.
The predicted offsets are staged and written into the segment's cache by the model's
``TrainingCallback`` after the iteration (recursive refinement).

Nothing on one segment kills a long run silently; each case is warned, counted (``skipped/*`` in
the logs and ``trainer.skipped_steps``) and skipped:

- ``empty_segment``: the segment's point cloud has no points -> the step is skipped.
- ``no_visible``: a target view sees none of the Gaussians -> that target is left out of the step
  (the step is skipped if no target remains).
- ``nonfinite``: NaN/Inf in the loss -> no optimizer step, gradients dropped.
- ``oom``: CUDA out of memory on a segment -> step skipped, CUDA cache emptied.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Optional, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallbackLocation
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from evolsplat_ns.data.types import Sample
from evolsplat_ns.model.evolsplat_model import EmptySegmentError, SampleLoss
from evolsplat_ns.utils.timing import phase


@dataclass
class EVolSplatTrainerConfig(TrainerConfig):
    _target: Type = field(default_factory=lambda: EVolSplatTrainer)
    gradient_clip_val: Optional[float] = None
    """Clip the global gradient norm of every optimizer to this value (None = off)."""
    use_mixed_precision: bool = False
    """Autocast + GradScaler (CUDA only); rasterisation always runs in fp32."""


def require_device(device_type: str) -> None:
    """Exit with one line (no traceback) when the configured device does not exist here."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("evolsplat: --machine.device-type is cuda but CUDA is not available on this machine "
                         "(no GPU, or a CPU-only torch); pass --machine.device-type cpu")


class EVolSplatTrainer(Trainer):
    config: EVolSplatTrainerConfig

    def __init__(self, config: EVolSplatTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        require_device(config.machine.device_type)
        if config.use_mixed_precision:
            config.mixed_precision = True
        if config.gradient_clip_val is not None:
            for opt in config.optimizers.values():
                opt["optimizer"].max_norm = config.gradient_clip_val
        super().__init__(config, local_rank, world_size)
        self.skipped_steps: dict[str, int] = defaultdict(int)

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        super().setup(test_mode)
        # Segments beyond the host-memory bound spill under the run folder, not a system temp dir.
        self.pipeline.model.segments.set_spill_dir(self.base_dir / "segments")

    def train_step(self, step: int):
        """One iteration as nerfstudio's training loop runs it: callbacks before, ``train_iteration``,
        callbacks after (the offset commit is one). For drivers other than ``Trainer.train``."""
        for callback in self.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        out = self.train_iteration(step)
        for callback in self.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        return out

    def train_iteration(self, step: int):
        self.optimizers.zero_grad_all()
        model = self.pipeline.model
        model.offsets.discard()
        with phase("data"):
            sample, batch = self.pipeline.datamanager.next_train(step)
        model.step = step
        try:
            result = self._sample_loss(sample, batch, step)
        except torch.cuda.OutOfMemoryError:
            return self._skip(step, "oom", f"CUDA out of memory on segment {sample.key}")
        except EmptySegmentError as e:
            return self._skip(step, "empty_segment", str(e))
        for v in result.dropped_targets:
            self._count("no_visible", step, f"target {v} of segment {sample.key} sees no Gaussian; left out")
        loss = result.total
        if result.projected_index.numel() == 0 and not result.nonfinite:
            return self._skip(step, "no_visible_step", f"no target view of segment {sample.key} sees any Gaussian")
        if not math.isfinite(float(loss)):
            return self._skip(step, "nonfinite", f"non-finite loss {float(loss)} on segment {sample.key}")
        self.optimizers.optimizer_scaler_step_all(self.grad_scaler)
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.update()
        if scale <= self.grad_scaler.get_scale():
            self.optimizers.scheduler_step_all(step)
        model.offsets.stage(result.state, result.projected_index)
        metrics = {"psnr": result.psnr, "num_gaussians": torch.tensor(float(result.projected_index.numel()))}
        return loss, result.losses, metrics

    def _sample_loss(self, sample: Sample, batch: dict, step: int) -> SampleLoss:
        """The model's one loss loop with per-target backward (graphs freed between targets)."""
        device_type = self.device.split(":")[0]
        return self.pipeline.model.sample_loss(
            sample, batch.get("point_cloud"), step,
            backward=lambda loss: self.grad_scaler.scale(loss).backward(),
            autocast=lambda: torch.autocast(device_type=device_type, enabled=self.mixed_precision))

    def _count(self, reason: str, step: int, message: str) -> None:
        self.skipped_steps[reason] += 1
        CONSOLE.print(f"[yellow]step {step}: {message} ({self.skipped_steps[reason]} {reason} so far)")
        writer.put_scalar(name=f"skipped/{reason}", scalar=self.skipped_steps[reason], step=step)

    def _skip(self, step: int, reason: str, message: str):
        """Drop this step's gradients, count it, warn, and keep training."""
        self.optimizers.zero_grad_all()
        if reason == "oom":
            torch.cuda.empty_cache()
        self._count(reason, step, f"{message}; step skipped")
        nan = torch.tensor(float("nan"))
        return nan, {"rgb_loss": nan}, {"skipped": torch.tensor(1.0)}
