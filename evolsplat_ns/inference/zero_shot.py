"""Zero-shot evaluation: render the held-out frames of scenes the model never trained on.

This is the held-out loop of :mod:`evolsplat_ns.engine.evaluation` (the one ``ns-eval`` runs, so
both report the same numbers) with stage timings and a few prediction | ground truth | error rows
collected on the way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from evolsplat_ns.engine.evaluation import HeldOutView, evaluate_held_out, summarise
from evolsplat_ns.utils.timing import StageTimer

if TYPE_CHECKING:
    from evolsplat_ns.engine.pipeline import EVolSplatPipeline


@dataclass
class ZeroShotResult:
    """Outcome of :func:`evaluate_zero_shot`.

    Attributes:
        metrics: ``summarise`` output: mean metrics, ``per_scene``, ``num_views``, LPIPS availability,
            plus ``per_camera`` (the same means grouped by camera, keyed ``{id}_{name}``, across scenes).
        timing: per stage (``segment_setup_ms``, ``encode_ms``, ``render_ms``, ``rasterize_ms``) mean/median/min/max/count.
        grid_rows: uint8 [H, 3W, 3] prediction | ground truth | error of up to ``max_grid_rows`` views.
        grid_labels: per grid row, the view (``scene_frame_cam``) and its PSNR.
    """

    metrics: dict
    timing: dict
    grid_rows: list[np.ndarray] = field(default_factory=list)
    grid_labels: list[str] = field(default_factory=list)


def _grid_picks(total: int, count: int) -> set[int]:
    """``count`` view indices evenly spread over ``total`` views."""
    return set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()) if total else set()


@torch.no_grad()
def evaluate_zero_shot(pipeline: EVolSplatPipeline, max_grid_rows: int = 8, progress: bool = True) -> ZeroShotResult:
    """Render and score every held-out view of ``pipeline``'s dataset, timed, with grid rows."""
    dataset, model = pipeline.datamanager.dataset, pipeline.model
    total = dataset.num_eval_views
    picks = _grid_picks(total, max_grid_rows)
    timer = StageTimer(model.device)
    rows: list[np.ndarray] = []
    labels: list[str] = []
    per_camera: dict[str, list[dict]] = defaultdict(list)
    counter = iter(range(total))

    def keep_row(view: HeldOutView) -> None:
        cam = int(view.sample.target.cam_ids[view.view])
        scene = dataset.scenes[dataset.segments[dataset.segment_index(view.sample.key)].scene_index]
        per_camera[f"{cam}_{scene.camera_names[cam]}"].append(view.metrics)
        if next(counter) in picks:
            rows.append((view.images["img"].clamp(0, 1) * 255).round().byte().cpu().numpy())
            labels.append(f"{view.name} {view.metrics['psnr']:.1f}dB")

    metrics = evaluate_held_out(model, pipeline.datamanager, keep_row, timer, progress)
    metrics["per_camera"] = summarise(per_camera)["per_scene"]  # the same aggregation, grouped by camera
    return ZeroShotResult(metrics, timer.summary(), rows, labels)
