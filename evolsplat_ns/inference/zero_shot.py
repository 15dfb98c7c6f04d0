"""Zero-shot evaluation: render the held-out frames of scenes the model never trained on.

For every eval item (one held-out frame of one segment) the segment's Gaussians are reconstructed
feed-forward from the item's source views (``encode``), then each target camera is predicted and
rasterised (``render``). Metrics follow ns-eval (the model's image metrics, LiDAR depth where
present, aggregated by the pipeline's ``summarise``); stage timings are collected on the way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from evolsplat_ns.engine.pipeline import summarise
from evolsplat_ns.inference.timing import StageTimer

if TYPE_CHECKING:
    from evolsplat_ns.engine.pipeline import EVolSplatPipeline


@dataclass
class ZeroShotResult:
    """Outcome of :func:`evaluate_held_out`.

    Attributes:
        metrics: ``summarise`` output: mean metrics, ``per_scene``, ``num_views``, LPIPS availability.
        timing: per stage (``segment_setup_ms``, ``encode_ms``, ``render_ms``, ``rasterize_ms``) mean/median/min/max/count.
        grid_rows: uint8 [H, 3W, 3] prediction | ground truth | error of up to ``max_grid_rows`` views.
    """

    metrics: dict
    timing: dict
    grid_rows: list[np.ndarray] = field(default_factory=list)


def _grid_picks(total: int, count: int) -> set[int]:
    """``count`` view indices evenly spread over ``total`` views."""
    return set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()) if total else set()


@torch.no_grad()
def evaluate_held_out(pipeline: EVolSplatPipeline, max_grid_rows: int = 8, progress: bool = True) -> ZeroShotResult:
    """Render and score every held-out view of ``pipeline``'s dataset (its eval items).

    Segments are reconstructed from their own point clouds and source views only (nodes of
    segments already known to the model are reused; :func:`load_pipeline` clears them for new data).
    """
    dataset, model = pipeline.datamanager.dataset, pipeline.model
    if not dataset.eval_items:
        raise ValueError(f"no held-out frames in {dataset.config.data}: all scenes must be eval scenes "
                         "with eval_frame_interval > 0")
    timer = StageTimer(model.device)
    num_cams = len(dataset.scenes[0].cameras)
    picks = _grid_picks(len(dataset.eval_items) * num_cams, max_grid_rows)
    per_scene: dict[str, list[dict]] = defaultdict(list)
    rows, view_counter = [], 0
    for i in tqdm(range(len(dataset.eval_items)), desc="held-out frames", disable=not progress):
        sample = dataset.eval_sample(i)
        key, seg = str(sample.key), dataset.segment_index(sample.key)
        if key in model.nodes:
            model.set_context(key, sample.source)
        else:
            with timer("segment_setup_ms"):  # point cloud + anchor Gaussians, once per segment
                model.set_context(key, sample.source, dataset.point_cloud(seg))
        with timer("encode_ms"):
            state = model.encode(split_backward=False)
        target = sample.target.to(model.device)
        for v in range(len(target)):
            with timer("render_ms"):
                out = model.render(state, target.camtoworlds[v], target.intrinsics[v], target.width, target.height)
            background = model.predictor.predict_background(state)
            with timer("rasterize_ms"):  # the Gaussians exist now: rasterisation alone
                model.rasterize_gaussians(out["gaussians"], background, target.camtoworlds[v],
                                          target.intrinsics[v], target.width, target.height)
            metrics, images = model.get_image_metrics_and_images(out, {"image": target.images[v]})
            metrics.update(pipeline.lidar_depth_metrics(sample, v, out["depth"]))
            per_scene[sample.key.scene].append(metrics)
            if view_counter in picks:
                rows.append((images["img"].clamp(0, 1) * 255).round().byte().cpu().numpy())
            view_counter += 1
    return ZeroShotResult(summarise(per_scene), timer.summary(), rows)
