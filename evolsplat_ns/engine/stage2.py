"""``OnlineStage2Trainer``: when stage 2 runs, in which mode, and what it measured.

A small controller with explicit state, driven by two nerfstudio ``TrainingCallback`` s (the
pipeline adds them when the model has a stage-2 refiner):

- before each iteration it decides :meth:`should_run` and sets ``model.stage2_active``; the model
  then refines the step's actors inside its one loss loop, so the stage-2 loss is back-propagated
  with the step, **before** the optimizer step (its own param group ``stage2``);
- after the iteration it reads ``model.stage2_report`` and counts the outcome.

Schedule: stage 2 starts at ``start_step`` when set, else at the first step of epoch
``stage2_start_epoch`` (an epoch is one pass over the training segments: ``steps_per_epoch`` =
training segments × ``iters_per_segment``, as :class:`evolsplat_ns.data.scheduler.SegmentScheduler`
defines it); from there it runs every ``stage2_frequency`` steps.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from evolsplat_ns.model.stage2.config import Stage2Config, Stage2Mode
from evolsplat_ns.model.stage2.step import OUTCOMES, Stage2Report

SKIP_REASONS = ("schedule", "no_objects", "nonfinite", "oom", "stage1_skipped")
"""Why a call did not run stage 2: not scheduled; no object with a box in the segment; non-finite
stage-2 loss; CUDA OOM inside stage 2; stage 1 failed the step before stage 2 finished."""
MIN_POINT_BUDGET = 256
GROW_AFTER_CLEAN_RUNS = 200
SUMMARY_EVERY_CALLS = 100
"""A one-line stage-2 summary prints to the console every this many calls."""
_SERIES = ("losses", "times", "refine_times", "peak_mem", "objects", "points", "trans", "rot", "segmentation_times",
           "flow_times", "aggregation_times")
PROCESS_PARTS = ("segmentation", "flow", "aggregation")
"""The processor's components (their time shares are in the statistics next to refine and loss)."""


class OnlineStage2Trainer:
    """Schedule, modes, point budget and statistics of the online stage-2 refiner.

    Args:
        config: the stage-2 settings (``model.config.stage2``).
        model: the :class:`~evolsplat_ns.model.evolsplat_model.EVolSplatModel` (with ``stage2`` set).
        optimizers: nerfstudio's optimizers (group ``stage2``), or None (schedule tests).
        steps_per_epoch: training steps per pass over the training segments.
    """

    def __init__(self, config: Stage2Config, model, optimizers: Optional[Optimizers], steps_per_epoch: int) -> None:
        if config.stage2_frequency < 1:
            raise ValueError(f"stage2_frequency must be >= 1, got {config.stage2_frequency}")
        self.config, self.model, self.optimizers = config, model, optimizers
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.calls = 0
        self.skipped: Counter[str] = Counter({r: 0 for r in SKIP_REASONS})
        self.runs = 0
        self._scheduled = False
        self._clean_runs = 0
        self._series: dict[str, list[float]] = {k: [] for k in _SERIES}
        self._log = True
        """Write stage2/ scalars to nerfstudio's writer and print the periodic summary line."""
        if model is not None and getattr(model, "stage2_counters", None):
            self.load_state_dict(model.stage2_counters)  # resumed: the checkpoint's counters go on

    # -- schedule ------------------------------------------------------------------------------------

    @property
    def start_step(self) -> int:
        c = self.config
        return c.start_step if c.start_step is not None else c.stage2_start_epoch * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def has_started(self, epoch: int, step: int) -> bool:
        """Has the schedule started at (``epoch``, ``step``) (``start_step``, else ``stage2_start_epoch``)?"""
        c = self.config
        if not c.enabled:
            return False
        return step >= c.start_step if c.start_step is not None else epoch >= c.stage2_start_epoch

    def should_run(self, epoch: int, step: int) -> bool:
        """Stage 2 at (``epoch``, ``step``)? On from the start (step, or epoch), every ``stage2_frequency`` steps."""
        return self.has_started(epoch, step) and (step - self.start_step) % self.config.stage2_frequency == 0

    # -- modes ---------------------------------------------------------------------------------------

    def set_training_mode(self, mode: Stage2Mode) -> None:
        """Switch mode: the frozen head is not run, and its parameters leave the ``stage2`` optimizer group."""
        if mode not in ("joint", "gaussian_only", "pose_only"):
            raise ValueError(f"stage2_training_mode must be joint, gaussian_only or pose_only, got {mode!r}")
        refiner = self.model.stage2
        refiner.mode = mode
        params = refiner.trainable_parameters(mode)
        if self.optimizers is not None and "stage2" in self.optimizers.optimizers:
            self.optimizers.optimizers["stage2"].param_groups[0]["params"] = params
            self.optimizers.parameters["stage2"] = params
        refiner.zero_grad(set_to_none=True)

    # -- callbacks -----------------------------------------------------------------------------------

    def callbacks(self) -> list[TrainingCallback]:
        return [TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.before_step),
                TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.after_step)]

    def before_step(self, step: int) -> None:
        self.calls += 1
        if self.has_started(self.epoch_of(step), step):
            self.model.stage2_started = True  # the processor runs on each segment from now on
        self._scheduled = self.should_run(self.epoch_of(step), step)
        self.model.stage2_active = self._scheduled
        self.model.stage2_report = None
        if not self._scheduled:
            self.skipped["schedule"] += 1

    def after_step(self, step: int) -> None:
        if self._scheduled:
            self._scheduled = self.model.stage2_active = False
            self.record(self.model.stage2_report)
            if self._log:
                numbers = {k: float(v) for k, v in self.get_statistics().items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
                writer.put_dict(name="stage2", scalar_dict=numbers, step=step)
        self.model.stage2_counters = self.state_dict()  # travels in checkpoints (model extra state)
        if self._log and self.calls % SUMMARY_EVERY_CALLS == 0:
            CONSOLE.print(f"step {step}: {self.summary_line()}")

    def record(self, report: Optional[Stage2Report]) -> None:
        """Count one scheduled step's outcome (None: stage 1 failed the step first)."""
        if report is None:
            self.skipped["stage1_skipped"] += 1
            return
        assert report.outcome in OUTCOMES, report.outcome
        if report.outcome != "ran":
            self.skipped[report.outcome] += 1
            if report.outcome == "oom":
                self._shrink_budget()
            return
        self.runs += 1
        process = [report.process_s.get(p, 0.0) for p in PROCESS_PARTS]
        for key, value in zip(_SERIES, (report.loss, report.time_s, report.refine_s, report.peak_mem_mb, report.objects,
                                        report.points_per_object, report.trans_m, report.rot_deg, *process)):
            self._series[key].append(float(value))
        self._clean_runs += 1
        if self._clean_runs >= GROW_AFTER_CLEAN_RUNS:
            self._grow_budget()

    def _shrink_budget(self) -> None:
        refiner = self.model.stage2
        refiner.point_budget = max(MIN_POINT_BUDGET, refiner.point_budget // 2)
        self._clean_runs = 0

    def _grow_budget(self) -> None:
        refiner = self.model.stage2
        refiner.point_budget = min(self.config.max_points_per_object, int(math.ceil(refiner.point_budget * 1.25)))
        self._clean_runs = 0

    # -- statistics ----------------------------------------------------------------------------------

    def get_statistics(self) -> dict:
        """Measured numbers only (plain Python values); ``runs + sum(skipped_*) == calls``."""
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        s = self._series
        total_time = sum(s["times"])
        loss_status = self.model.stage2_loss.status() if self.model.stage2_loss is not None else {}
        return {
            "calls": self.calls, "runs": self.runs,
            **{f"skipped_{r}": int(self.skipped[r]) for r in SKIP_REASONS},
            "run_ratio": self.runs / self.calls if self.calls else 0.0,
            "last_loss": s["losses"][-1] if s["losses"] else math.nan,
            "avg_loss": mean(s["losses"]) if s["losses"] else math.nan,
            "time_total_s": total_time, "time_avg_s": mean(s["times"]),
            **self._time_shares(total_time),
            "peak_mem_mb_avg": mean(s["peak_mem"]), "peak_mem_mb_max": max(s["peak_mem"], default=0.0),
            "objects_avg": mean(s["objects"]), "points_per_object_avg": mean(s["points"]),
            "point_budget": self.model.stage2.point_budget,
            "pose_corr_trans_m_avg": mean(s["trans"]), "pose_corr_rot_deg_avg": mean(s["rot"]),
            "mode": self.model.stage2.mode,
            **self._processor_status(),
            "lpips": loss_status.get("lpips", "off"), "consistency": loss_status.get("consistency", "off"),
        }

    def _time_shares(self, total: float) -> dict[str, float]:
        """Measured share of stage-2 time per component: the processor's segmentation / flow /
        aggregation (on the steps it ran), the refine heads' forward, and the rest (loss + backward)."""
        s = self._series
        parts = {p: sum(s[f"{p}_times"]) for p in PROCESS_PARTS}
        parts["refine"] = sum(s["refine_times"])
        shares = {f"time_ratio_{p}": (v / total if total > 0 else 0.0) for p, v in parts.items()}
        shares["time_ratio_loss_and_backward"] = max(0.0, 1 - sum(parts.values()) / total) if total > 0 else 0.0
        return shares

    def _processor_status(self) -> dict:
        processor = getattr(self.model, "stage2_processor", None)
        if processor is None:
            return {"segmenter_trusted": False, "flow_trusted": False, "flow_source": "none", "objects_from": "none",
                    "objects_discovered": 0}
        status = processor.status()
        return {k: status[k] for k in ("segmenter_trusted", "flow_trusted", "flow_source", "objects_from",
                                        "objects_discovered")}

    def state_dict(self) -> dict:
        return {"calls": self.calls, "runs": self.runs, "skipped": dict(self.skipped), "clean_runs": self._clean_runs,
                "series": {k: list(v) for k, v in self._series.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.runs, self._clean_runs = state["calls"], state["runs"], state["clean_runs"]
        self.skipped = Counter({r: int(state["skipped"].get(r, 0)) for r in SKIP_REASONS})
        self._series = {k: list(state["series"].get(k, [])) for k in _SERIES}

    def write_statistics(self, run_dir: Path) -> Path:
        """``stage2_stats.json`` in ``run_dir`` (the trainer calls this at each checkpoint)."""
        path = Path(run_dir) / "stage2_stats.json"
        stats = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.get_statistics().items()}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        tmp.replace(path)
        return path

    def summary_line(self) -> str:
        s = self.get_statistics()
        return (f"stage2: {s['runs']}/{s['calls']} runs (skips: " +
                ", ".join(f"{r} {s['skipped_' + r]}" for r in SKIP_REASONS) +
                f"), loss {s['last_loss']:.4g}, {s['time_avg_s'] * 1000:.1f} ms/run, {s['objects_avg']:.1f} objects, "
                f"pose corr {s['pose_corr_trans_m_avg']:.3f} m / {s['pose_corr_rot_deg_avg']:.2f} deg, mode {s['mode']}")
