"""EVolSplat's training step as a nerfstudio ``Trainer``.

One iteration: zero grads; fetch a sample and make its segment the model's context; run the
shared feature extraction once (sparse volume, 2D window sampling); then for each target view
predict Gaussians, render foreground + background, ``loss_v / num_targets`` and ``backward()``
without ``retain_graph``, so each target's graph is freed before the next; backpropagate the
shared part once; clip (nerfstudio unscales first under AMP); one optimizer step; write the
predicted offsets into the segment's cache (recursive refinement).

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
from typing import Optional, Type

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from evolsplat_ns.data.types import Sample
from evolsplat_ns.model.evolsplat_model import EmptySegmentError
from evolsplat_ns.utils.timing import phase


@dataclass
class EVolSplatTrainerConfig(TrainerConfig):
    _target: Type = field(default_factory=lambda: EVolSplatTrainer)
    gradient_clip_val: Optional[float] = None
    """Clip the global gradient norm of every optimizer to this value (None = off)."""
    use_mixed_precision: bool = False
    """Autocast + GradScaler (CUDA only); rasterisation always runs in fp32."""


class EVolSplatTrainer(Trainer):
    config: EVolSplatTrainerConfig

    def __init__(self, config: EVolSplatTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        if config.use_mixed_precision:
            config.mixed_precision = True
        if config.gradient_clip_val is not None:
            for opt in config.optimizers.values():
                opt["optimizer"].max_norm = config.gradient_clip_val
        super().__init__(config, local_rank, world_size)
        self.skipped_steps: dict[str, int] = defaultdict(int)

    def train_iteration(self, step: int):
        self.optimizers.zero_grad_all()
        pipeline, model = self.pipeline, self.pipeline.model
        with phase("data"):
            sample, batch = pipeline.datamanager.next_train(step)
        model.step = step
        try:
            loss, loss_dict, metrics, state = self._forward_backward(sample, batch, step)
        except torch.cuda.OutOfMemoryError:
            return self._skip(step, "oom", f"CUDA out of memory on segment {sample.key}")
        except EmptySegmentError as e:
            return self._skip(step, "empty_segment", str(e))
        if state is None:
            return self._skip(step, "no_visible_step", f"no target view of segment {sample.key} sees any Gaussian")
        if not math.isfinite(float(loss)):
            return self._skip(step, "nonfinite", f"non-finite loss {float(loss)} on segment {sample.key}")
        self.optimizers.optimizer_scaler_step_all(self.grad_scaler)
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.update()
        if scale <= self.grad_scaler.get_scale():
            self.optimizers.scheduler_step_all(step)
        model.commit_offsets(state, metrics.pop("projected_index"))
        return loss, loss_dict, metrics

    def _forward_backward(self, sample: Sample, batch: dict, step: int):
        """Shared encode once, then one forward + backward per target view."""
        pipeline, model = self.pipeline, self.pipeline.model
        device_type = self.device.split(":")[0]
        with torch.autocast(device_type=device_type, enabled=self.mixed_precision):
            with phase("prepare"):
                pipeline.prepare(sample, batch)
            state = model.encode()
        tgt = sample.target.to(self.device)
        n = len(tgt)
        totals: dict[str, torch.Tensor] = defaultdict(float)
        psnr = 0.0
        projected = []
        for v in range(n):
            with torch.autocast(device_type=device_type, enabled=self.mixed_precision):
                out = model.render(state, tgt.camtoworlds[v], tgt.intrinsics[v], tgt.width, tgt.height)
                if len(out["gaussians"]) == 0:
                    self._count("no_visible", step, f"target {v} of segment {sample.key} sees no Gaussian; left out")
                    continue
                losses = {k: val / n for k, val in model.view_loss(out, tgt.images[v], step).items()}
                loss_v = sum(losses.values())
            if not torch.isfinite(loss_v):
                return loss_v.detach(), {}, {}, state
            with phase("backward"):
                self.grad_scaler.scale(loss_v).backward()
            for k, val in losses.items():
                totals[k] = totals[k] + val.detach()
            psnr += float(-10 * torch.log10(((out["rgb"].detach().float() - tgt.images[v]) ** 2).mean())) / n
            projected.append(out["gaussians"].index)
            del out, losses, loss_v  # free this target's graph before the next
        if not projected:
            return torch.zeros(()), {}, {}, None
        with phase("backward"):
            state.backward_shared()
        loss = sum(totals.values())
        index = torch.unique(torch.cat(projected))
        metrics = {"psnr": torch.tensor(psnr), "num_gaussians": torch.tensor(float(index.numel())),
                   "projected_index": index}
        return loss, dict(totals), metrics, state

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
