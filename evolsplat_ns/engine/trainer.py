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
- ``nonfinite``: NaN/Inf in the loss -> no optimizer step, gradients dropped (``nonfinite_check``:
  read on the host after the backward, or skipped on the device and counted one step later).
- ``oom``: CUDA out of memory on a segment -> step skipped, CUDA cache emptied.

More than ``max_skipped_fraction`` of the last ``skip_window`` steps skipped stops the run
(:mod:`evolsplat_ns.engine.skips`).

Data parallel (``torchrun``, ``ns-train --machine.num-devices N``; :mod:`evolsplat_ns.engine.distributed`,
``docs/distributed.md``): each rank trains its own shard of segments with the same per-target
backward; after the target loop the ranks agree whether to skip (one rank skipping makes all skip,
reason ``peer_skip`` on the others, so skip counts and limits stay identical) and then average the
gradients in one all-reduce, clip and step: the step equals one process whose loss is the mean of
the ranks' sample losses. Evaluation, the viewer, logging and checkpoint writing are rank 0's; a
checkpoint holds every rank's segments and data stream. Checkpoints are written and found crash-safely
(:mod:`evolsplat_ns.engine.checkpoints`); a run folder that already holds checkpoints is only
trained into when resuming (``--load-dir``) or with ``--overwrite True``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallbackLocation
import tyro
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from evolsplat_ns.data.types import Sample
from evolsplat_ns.engine import checkpoints, distributed
from evolsplat_ns.engine.skips import DeferredNonfinite, SkipLimit
from evolsplat_ns.model.evolsplat_model import EmptySegmentError, SampleLoss
from evolsplat_ns.model.precision import allow_sparse_conv_tf32
from evolsplat_ns.utils.timing import phase


TIME_LIMIT_CHECK_EVERY = 10
"""Steps between the ranks' agreement on ``max_train_seconds`` (a broadcast each time)."""


@dataclass
class AdamConfig(AdamOptimizerConfig):
    """Adam (nerfstudio's), with gradient clipping set once for all optimizers by ``--gradient-clip-val``."""

    max_norm: tyro.conf.Suppress[Optional[float]] = None
    fused: bool = True
    """Adam's fused kernel (``torch.optim.Adam(fused=True)``: one launch per step for all
    parameters instead of a dozen for-each launches; torch has one for CUDA and one for the CPU)
    when every parameter is on one kind of device; the for-each implementation otherwise. Same
    update either way. ``nonfinite_check="deferred"`` needs it (the fused kernel skips a step on
    the device)."""

    def setup(self, params) -> torch.optim.Optimizer:
        params = list(params)
        kwargs = {k: v for k, v in vars(self).items() if k not in ("_target", "max_norm", "fused")}
        if self.fused and _one_device_type(params):
            kwargs["fused"] = True
        return self._target(params, **kwargs)


def _one_device_type(params: list) -> bool:
    """Whether ``params`` (tensors, or param-group dicts holding them) are all CUDA or all CPU tensors."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    return bool(tensors) and len({p.device.type for p in tensors}) == 1 and tensors[0].device.type in ("cuda", "cpu")


@dataclass
class EVolSplatTrainerConfig(TrainerConfig):
    """ns-train's trainer with EVolSplat's step (see the module docstring)."""

    _target: Type = field(default_factory=lambda: EVolSplatTrainer)
    gradient_clip_val: Optional[float] = None
    """Clip the global gradient norm of every optimizer to this value (None = off)."""
    use_mixed_precision: bool = False
    """Autocast (CUDA only) for the MLP heads; geometry, losses and rasterisation stay fp32 (see
    ``evolsplat_ns.model.precision``)."""
    mixed_precision_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    """Autocast dtype. bfloat16 has fp32's range, so it needs no GradScaler (no loss scaling, no
    per-step host read of the scale); float16 runs the sparse U-Net in fp16 too, behind a GradScaler."""
    tf32_matmul: bool = False
    """Let fp32 matrix products run on TF32 tensor cores (Ampere and newer GPUs; no effect on CPU).
    Process-wide (``torch.backends.cuda.matmul.allow_tf32``): besides the MLP heads and their
    backward it covers every fp32 ``matmul`` on CUDA, the geometry's too (point projections into
    the sources, box poses, the sky warp's rays: ~5e-4 relative rounding of their inputs).
    gsplat's own kernels and the sparse U-Net (spconv, see ``tf32_sparse_conv``) are unaffected.
    Off by default: measured on an H200 it did not speed up the step (1M Gaussians: 6.68 it/s on
    vs 6.85 off; 100k: 8.04 vs 7.93; docs/performance.md)."""
    tf32_sparse_conv: bool = False
    """Let the sparse U-Net's fp32 implicit GEMMs (spconv, forward and backward) run on TF32 tensor
    cores (spconv's ``SPCONV_ALLOW_TF32``; Ampere and newer GPUs). Process-wide like
    ``tf32_matmul``; the heads, rasterisation and geometry are unaffected."""
    max_skipped_fraction: float = 0.3
    """Stop when more than this share of the last ``skip_window`` steps were skipped (1 = never)."""
    skip_window: int = 50
    """Steps over which ``max_skipped_fraction`` is measured."""
    nonfinite_check: Literal["sync", "deferred"] = "sync"
    """How a step whose loss is NaN/Inf is skipped. "sync": the host reads the loss after the
    step's backward (the step's one device sync: it waits for the whole backward) and drops the
    step. "deferred": nothing waits; fused Adam skips its update on the device from a device flag
    (parameters and moments untouched), the offset cache keeps its values, and the flag is read
    during the next step to count and report the skip (one step late; the learning-rate schedule
    still advances on that step). Needs fused Adam and one process without a GradScaler (float16);
    otherwise "sync" is used, said once."""
    deterministic: bool = False
    """Bit-exact repeatable runs and resume: one CPU thread and torch's deterministic algorithms
    (slower). Without it, CPU runs with more than one thread may differ in the last bits."""
    distributed_timeout: float = 600.0
    """Seconds any rank of a data-parallel run waits for the others in a collective (gradient
    all-reduce, checkpoint gather) before the job stops with a message naming the dead or hung
    rank's operation. Must exceed the longest phase only rank 0 runs (evaluation of all images)."""
    max_train_seconds: Optional[float] = None
    """Stop training after this many seconds of this process's training loop (from its first step;
    set-up excluded) and save a checkpoint of the last trained step, as at the end of training:
    for jobs under a wall-time limit. Resume with ``--load-dir`` (nerfstudio then runs up to
    ``max_num_iterations`` more steps). None = no limit. Under data parallelism rank 0's clock
    decides, checked every ``TIME_LIMIT_CHECK_EVERY`` steps."""
    overwrite: bool = False
    """Train into a run folder that already holds checkpoints (they are replaced once this run
    saves its first verified checkpoint). Without it such a folder is refused unless resuming."""
    # One name per knob: nerfstudio's ``mixed_precision`` is set from ``use_mixed_precision``;
    # ``prompt`` is for text-to-NeRF methods.
    mixed_precision: tyro.conf.Suppress[bool] = False
    prompt: tyro.conf.Suppress[Optional[str]] = None

    def save_config(self) -> None:
        """Refuse a run folder holding another run's checkpoints before its config.yml is replaced.
        Under torchrun only rank 0 writes it (every rank runs ns-train's ``main``)."""
        refuse_reused_run_folder(self)
        if distributed.world_from_env().is_main:
            super().save_config()

    def print_to_terminal(self) -> None:
        if distributed.world_from_env().is_main:
            super().print_to_terminal()


def refuse_reused_run_folder(config: EVolSplatTrainerConfig) -> None:
    """RunFolderError if ``config``'s checkpoint folder holds checkpoints this run would destroy.

    Allowed: resuming (``load_dir`` / ``load_checkpoint`` given), ``overwrite``, or checkpoints this
    process wrote itself.
    """
    folder = config.get_checkpoint_dir()
    found = checkpoints.list_checkpoints(folder)
    resuming = config.load_dir is not None or config.load_checkpoint is not None
    if found and not (resuming or config.overwrite or checkpoints.written_by_this_process(folder)):
        raise RunFolderError(
            f"{config.get_base_dir()} already holds a run with checkpoints ({found[-1][1].name}); training "
            f"into it would replace them. Resume it with --load-dir {folder}, choose another "
            "--timestamp/--experiment-name, or pass --overwrite True to replace it")


class RunFolderError(checkpoints.CheckpointError, FileExistsError):
    """The run folder already holds another run's checkpoints."""


def _without_viewer(vis: str) -> str:
    """``--vis`` for a rank other than 0: the same loggers (nerfstudio's writers write on rank 0
    only anyway), no viewer."""
    rest = vis.replace("viewer_legacy", "").replace("viewer", "").strip("+")
    return rest or "tensorboard"


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
        if config.deterministic:
            torch.set_num_threads(1)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.dist = distributed.setup(config.machine.device_type, config.distributed_timeout, local_rank)
        world = self.dist.world
        if world.parallel:
            local_rank, world_size = world.local_rank, world.size
            # ranks may have stamped their run folder a second apart: all use rank 0's
            config.timestamp = self.dist.broadcast_object(config.timestamp, "agreeing on the run folder")
            if not world.is_main:  # one viewer per job (nerfstudio starts one per node's local rank 0)
                config.vis = _without_viewer(config.vis)
        refuse_reused_run_folder(config)
        super().__init__(config, local_rank, world_size)
        self.skipped_steps: dict[str, int] = defaultdict(int)
        self.skip_limit = SkipLimit(config.max_skipped_fraction, config.skip_window)
        self.deferred_skip = DeferredNonfinite()
        self._sync_check_why: Optional[str] = None  # why "deferred" fell back to "sync" (said once)
        self._clock_start: Optional[float] = None
        self._time_limit_step: Optional[int] = None
        self.autocast_dtype = torch.bfloat16 if config.mixed_precision_dtype == "bfloat16" else torch.float16
        if self.mixed_precision and self.autocast_dtype == torch.bfloat16 and not config.use_grad_scaler:
            self.use_grad_scaler = False
            self.grad_scaler = torch.amp.GradScaler("cuda", enabled=False)

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        # Process-wide, so set by the job that owns the process (the trainer), not by the model.
        torch.backends.cuda.matmul.allow_tf32 = self.config.tf32_matmul
        allow_sparse_conv_tf32(self.config.tf32_sparse_conv)
        super().setup(test_mode)
        # Segments beyond the host-memory bound spill under the run folder, not a system temp dir.
        world = self.dist.world
        spill = self.base_dir / "segments"
        self.pipeline.model.segments.set_spill_dir(spill / f"rank{world.rank}" if world.parallel else spill)
        # every rank starts from rank 0's weights (each was seeded differently by its launcher)
        self.dist.broadcast_module(self.pipeline.model)

    def train_step(self, step: int):
        """One iteration as nerfstudio's training loop runs it: callbacks before, ``train_iteration``,
        callbacks after (the offset commit is one). For drivers other than ``Trainer.train``."""
        with phase("callbacks"):
            for callback in self.callbacks:
                callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        out = self.train_iteration(step)
        with phase("callbacks"):
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
        result, skip = self._local_loss(sample, batch, step)
        # The previous step's deferred flag: this step's renders have synchronised past it.
        self.report_deferred_skip()
        bad = None
        if skip is None and self._defers_nonfinite_check():
            bad = self.deferred_skip.flag(step, str(sample.key), result.total)
        else:
            skip = self._agree_on_skip(result, skip, step, sample)
            if skip is not None:
                return self._skip(step, *skip)
        if self.dist.world.parallel:
            with phase("allreduce"):
                self.dist.average_gradients(self._trained_parameters(), model.buffers(),
                                            f"the gradient all-reduce of step {step}")
        with phase("optimizer"):
            self._step_optimizers(bad)  # clips (max_norm) the averaged gradients
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.update()
            if scale <= self.grad_scaler.get_scale():
                self.optimizers.scheduler_step_all(step)
            model.offsets.stage(result.state, result.projected_index, keep=bad)
        metrics = {"psnr": result.psnr, "num_gaussians": torch.tensor(float(result.projected_index.numel()))}
        self._stop_if_out_of_time(step)
        return result.total, result.losses, metrics

    def _stop_if_out_of_time(self, step: int) -> None:
        """Ask nerfstudio's loop to stop after ``step`` once ``max_train_seconds`` have passed."""
        limit = self.config.max_train_seconds
        if limit is None:
            return
        now = time.perf_counter()
        if self._clock_start is None:
            self._clock_start = now
        out_of_time = now - self._clock_start >= limit
        if self.dist.world.parallel:
            if step % TIME_LIMIT_CHECK_EVERY:
                return
            # every rank must stop after the same step, or the next all-reduce waits forever
            out_of_time = self.dist.broadcast_object(out_of_time, f"the time-limit check of step {step}")
        if out_of_time:
            self.stop_training = True
            self._time_limit_step = step
            CONSOLE.print(f"max_train_seconds={limit:g} reached after step {step}: saving a checkpoint and "
                          f"stopping; resume with --load-dir {self.checkpoint_dir}")

    def _after_train(self) -> None:
        # nerfstudio's loop has already advanced ``self.step`` to the step it did not run when it
        # stops early; the checkpoint must carry the last step trained, or a resume skips one.
        if self._time_limit_step is not None:
            self.step = self._time_limit_step
        self.report_deferred_skip()
        super()._after_train()

    def _defers_nonfinite_check(self) -> bool:
        """Whether this step's non-finite check is deferred (``nonfinite_check``), saying once why not."""
        if self.config.nonfinite_check != "deferred":
            return False
        if self._sync_check_why is None:
            unfused = [name for name, opt in self.optimizers.optimizers.items() if not opt.defaults.get("fused")]
            self._sync_check_why = (
                "a data-parallel run agrees on skips across ranks" if self.dist.world.parallel else
                "the float16 GradScaler reads its scale each step" if self.grad_scaler.is_enabled() else
                f"the optimizer(s) {unfused} are not fused Adam (optimizers.*.optimizer.fused)" if unfused else "")
            if self._sync_check_why:
                CONSOLE.print(f"[yellow]nonfinite_check=deferred needs one process, fused Adam and no GradScaler: "
                              f"{self._sync_check_why}, so non-finite steps are checked on the host (sync)")
        return not self._sync_check_why

    def _step_optimizers(self, skip: Optional[torch.Tensor]) -> None:
        """Clip and step every optimizer; with ``skip`` (device bool [], True = skip) fused Adam
        skips its update on the device (as float32 ``found_inf``, the flag torch's GradScaler
        hands fused optimizers)."""
        opts = list(self.optimizers.optimizers.values()) if skip is not None else []
        found_inf = skip.float() if skip is not None else None
        for opt in opts:
            opt.found_inf = found_inf
        try:
            self.optimizers.optimizer_scaler_step_all(self.grad_scaler)
        finally:
            for opt in opts:
                del opt.found_inf

    def report_deferred_skip(self) -> None:
        """Count and report the deferred step whose loss was non-finite (if the last one was).
        Each step calls it for the step before, and training's end for the last; drivers of
        :meth:`train_step` other than ``Trainer.train`` call it after their last step."""
        taken = self.deferred_skip.take()
        if taken is not None:
            step, message = taken
            self._count("nonfinite", step, message)
            self.skip_limit.record(step, "nonfinite")

    def _local_loss(self, sample: Sample, batch: dict, step: int
                    ) -> tuple[Optional[SampleLoss], Optional[tuple[str, str]]]:
        """This rank's losses and gradients of ``sample``, and (reason, message) if it cannot train."""
        try:
            result = self._sample_loss(sample, batch, step)
        except torch.cuda.OutOfMemoryError:
            return None, ("oom", f"CUDA out of memory on segment {sample.key}")
        except EmptySegmentError as e:
            return None, ("empty_segment", str(e))
        for v in result.dropped_targets:
            self._count("no_visible", step, f"target {v} of segment {sample.key} sees no Gaussian; left out")
        if result.projected_index.numel() == 0:
            return result, ("no_visible_step", f"no target view of segment {sample.key} sees any Gaussian")
        return result, None

    def _agree_on_skip(self, result: Optional[SampleLoss], skip: Optional[tuple[str, str]], step: int,
                       sample: Sample) -> Optional[tuple[str, str]]:
        """Whether (and why) this step is skipped. One process: its own reason, or a non-finite loss
        (the step's one host read of a device value). Data parallel: skipped on every rank if on any
        (one all-reduced flag, still one host read), so all ranks take the same optimizer steps."""
        if not self.dist.world.parallel:
            if skip is None and result.nonfinite:
                return "nonfinite", f"non-finite loss {float(result.total)} on segment {sample.key}"
            return skip
        flag = torch.ones((), device=self.device) if skip is not None else \
            (~torch.isfinite(result.total.to(self.device))).float()
        if not self.dist.any_rank(flag, f"the skip agreement of step {step}"):
            return None
        if skip is not None:
            return skip
        if result.nonfinite:
            return "nonfinite", f"non-finite loss {float(result.total)} on segment {sample.key}"
        return "peer_skip", "another rank cannot train this step, so no rank does (the ranks stay identical)"

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        """Every optimised parameter, in the same order on every rank."""
        return [p for group in self.optimizers.parameters.values() for p in group]

    def eval_iteration(self, step: int) -> None:
        """Evaluation runs on rank 0 only (the other ranks go on to the next step and wait there)."""
        if self.dist.world.is_main:
            super().eval_iteration(step)

    def _sample_loss(self, sample: Sample, batch: dict, step: int) -> SampleLoss:
        """The model's one loss loop with per-target backward (graphs freed between targets)."""
        device_type = self.device.split(":")[0]
        # No weight-cast cache: each target is its own autocast region (the cache would be dropped
        # per target anyway), and CUDA graphs of the heads cannot capture one.
        return self.pipeline.model.sample_loss(
            sample, batch.get("point_cloud"), step,
            backward=lambda loss: self.grad_scaler.scale(loss).backward(),
            autocast=lambda: torch.autocast(device_type=device_type, dtype=self.autocast_dtype,
                                            enabled=self.mixed_precision, cache_enabled=False))

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
        self.skip_limit.record(step, reason)
        nan = torch.tensor(float("nan"))
        return nan, {"rgb_loss": nan}, {"skipped": torch.tensor(1.0)}

    # -- checkpoints (crash-safe; see evolsplat_ns.engine.checkpoints) ---------------------------

    def save_checkpoint(self, step: int) -> None:
        """nerfstudio's checkpoint content, written atomically and verified before older ones go.

        Data parallel: called on every rank (it gathers every rank's segments and data stream to
        rank 0, :meth:`EVolSplatPipeline.gathered_state_dict`); only rank 0 writes, one file.
        """
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        pipeline_state = pipeline.gathered_state_dict(self.dist) if self.dist.world.parallel else pipeline.state_dict()
        if not self.dist.world.is_main:
            return
        state = {
            "step": step,
            "pipeline": pipeline_state,
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        if self.dist.world.parallel:
            state["distributed"] = {"world_size": self.dist.world.size}
        checkpoints.save_checkpoint(self.checkpoint_dir, step, state, self.config.save_only_latest_checkpoint)
        controller = getattr(pipeline, "stage2_controller", None)
        if controller is not None:
            controller.write_statistics(self.base_dir)

    def _load_checkpoint(self) -> None:
        """Resume from ``load_dir``'s newest intact checkpoint (broken ones named and skipped), or
        from ``load_step`` / ``load_checkpoint`` exactly; every failure names the file."""
        c = self.config
        if c.load_dir is not None and c.load_step is None:
            path, state = checkpoints.newest_loadable_checkpoint(Path(c.load_dir), CONSOLE.print)
        elif c.load_dir is not None or c.load_checkpoint is not None:
            path = Path(c.load_dir) / checkpoints.checkpoint_name(c.load_step) if c.load_dir is not None \
                else Path(c.load_checkpoint)
            state = checkpoints.load_checkpoint(path)
        else:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        self._start_step = state["step"] + 1
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and c.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}")
