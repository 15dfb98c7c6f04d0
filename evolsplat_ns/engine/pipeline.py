"""The EVolSplat pipeline: connects the data manager's samples to the model's segment context.

Training's inner loop (one backward per target view) lives in :mod:`evolsplat_ns.engine.trainer`;
this class prepares segments and runs evaluation (per held-out view, per scene and mean).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Type

import numpy as np
import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from evolsplat_ns.data.types import Sample
from evolsplat_ns.engine.datamanager import SegmentImages
from evolsplat_ns.engine.metrics import depth_metrics, lpips_status
from evolsplat_ns.geometry import invert_rigid, project_points
from evolsplat_ns.viewer.controls import SegmentControls


@dataclass
class EVolSplatPipelineConfig(VanillaPipelineConfig):
    _target: Type = field(default_factory=lambda: EVolSplatPipeline)


class EVolSplatPipeline(VanillaPipeline):
    config: EVolSplatPipelineConfig

    def __init__(self, config: EVolSplatPipelineConfig, device: str,
                 test_mode: Literal["test", "val", "inference"] = "val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler: Optional[Any] = None) -> None:
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        # A viewer renders bare cameras as soon as a browser connects (before any training step,
        # or right after ns-viewer loads a checkpoint), so there is always a context to render.
        self.shown: SegmentImages = self.datamanager.train_dataset
        self._show(self.shown)
        self.segments = SegmentControls(self.datamanager.dataset, self.show_segment, self._set_render_num_sources,
                                        self.shown, self.model.config.num_neighbour_select)

    def show_segment(self, segment_index: int) -> SegmentImages:
        """Make segment ``segment_index`` (of ``datamanager.dataset.segments``) the rendered context,
        with all its keyframe views as the source pool; returns those views (viewer frustums)."""
        self._show(SegmentImages.of_segment(self.datamanager.dataset, segment_index))
        return self.shown

    def _show(self, images: SegmentImages) -> None:
        point_cloud = self.datamanager.dataset.point_cloud(images.segment_index)
        self.prepare(images.sample, {"point_cloud": point_cloud})
        self.shown = images

    def _set_render_num_sources(self, count: int) -> None:
        self.model.render_num_sources = count

    def load_pipeline(self, loaded_state: dict[str, Any], step: int) -> None:
        """Load a checkpoint, then show a segment on the loaded nodes: the one shown before if the
        checkpoint has its node, else the first segment it has one for. Loading adds no node: with
        none in the checkpoint, the context made at construction (its node built from the point
        cloud) stays as it is."""
        super().load_pipeline(loaded_state, step)
        dataset = self.datamanager.dataset
        with_node = [i for i in range(len(dataset.segments)) if str(dataset.key(i)) in self.model.nodes]
        if self.shown.segment_index in with_node:
            self._show(self.shown)
        elif with_node:
            self.show_segment(with_node[0])

    def prepare(self, sample: Sample, batch: dict) -> None:
        """Make ``sample``'s segment the model's context (node built from the batch's point cloud)."""
        self.model.set_context(str(sample.key), sample.source, batch.get("point_cloud"))

    def sample_loss(self, sample: Sample, step: int) -> tuple[dict, dict]:
        """Losses over all target views of ``sample`` in one graph (mean over targets)."""
        state = self.model.encode(split_backward=False)
        tgt = sample.target.to(self.device)
        losses: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        psnrs = []
        for v in range(len(tgt)):
            out = self.model.render(state, tgt.camtoworlds[v], tgt.intrinsics[v], tgt.width, tgt.height)
            for k, val in self.model.view_loss(out, tgt.images[v], step).items():
                losses[k] = losses[k] + val / len(tgt)
            psnrs.append(-10 * torch.log10(((out["rgb"].detach() - tgt.images[v]) ** 2).mean()))
        return dict(losses), {"psnr": torch.stack(psnrs).mean()}

    def get_train_loss_dict(self, step: int):
        """Single-graph variant of a training step's losses (the trainer uses per-target backward)."""
        sample, batch = self.datamanager.next_train(step)
        self.prepare(sample, batch)
        losses, metrics = self.sample_loss(sample, step)
        return {}, losses, metrics

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        self.eval()
        sample, batch = self.datamanager.next_eval(step)
        self.prepare(sample, batch)
        losses, metrics = self.sample_loss(sample, step)
        self.train()
        return {}, losses, metrics

    @torch.no_grad()
    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        sample, batch = self.datamanager.next_eval_image(step)
        self.prepare(sample, batch)
        cam, img = self._target_camera(sample, 0)
        outputs = self.model.get_outputs_for_camera(cam)
        metrics, images = self.model.get_image_metrics_and_images(outputs, {"image": img})
        metrics["num_rays"] = img.shape[0] * img.shape[1]
        self.train()
        return metrics, images

    def _target_camera(self, sample: Sample, v: int):
        from evolsplat_ns.engine.cameras import views_to_cameras

        return views_to_cameras(sample.target)[v : v + 1], sample.target.images[v]

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> dict:
        """Metrics of every held-out view of every eval scene: per scene and mean.

        With ``output_path``, writes ``{scene}_{frame}_{cam}.png`` grids (prediction | GT | error).
        """
        self.eval()
        per_scene: dict[str, list[dict]] = defaultdict(list)
        prepared = None
        for camera, batch in self.datamanager.fixed_indices_eval_dataloader:
            sample: Sample = batch["sample"]
            if sample is not prepared:  # one context per sample: its views share the encoded state
                self.prepare(sample, {"point_cloud": self.datamanager.point_cloud_for(sample)})
                prepared = sample
            outputs = self.model.get_outputs_for_camera(camera)
            metrics, images = self.model.get_image_metrics_and_images(outputs, batch)
            metrics.update(self.lidar_depth_metrics(sample, batch["view"], outputs["depth"]))
            per_scene[sample.key.scene].append(metrics)
            if output_path is not None:
                self._save_grid(output_path, sample, batch["view"], images["img"])
        self.train()
        return summarise(per_scene, get_std)

    def lidar_depth_metrics(self, sample: Sample, v: int, depth: torch.Tensor) -> dict:
        if sample.lidar is None:
            return {}
        t = int(sample.target.frame_ids[v])
        pts = sample.lidar.points[sample.lidar.frame_ids == t].to(depth.device)
        w2c = invert_rigid(sample.target.camtoworlds[v : v + 1].to(depth.device))
        uv, z = project_points(pts, sample.target.intrinsics[v : v + 1].to(depth.device), w2c)
        return depth_metrics(depth, uv[0], z[0])

    @staticmethod
    def _save_grid(folder: Path, sample: Sample, v: int, grid: torch.Tensor) -> None:
        from PIL import Image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{sample.key.scene}_{int(sample.target.frame_ids[v]):03d}_{int(sample.target.cam_ids[v])}.png"
        Image.fromarray((grid.clamp(0, 1) * 255).byte().cpu().numpy()).save(folder / name)


def summarise(per_scene: dict[str, list[dict]], get_std: bool = False) -> dict:
    """Mean (and std) of every metric per scene and over all views, plus LPIPS availability."""
    def agg(rows: list[dict]) -> dict:
        keys = sorted({k for r in rows for k in r if isinstance(r[k], (int, float))})
        out = {}
        for k in keys:
            vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
            out[k] = float(vals.mean())
            if get_std:
                out[f"{k}_std"] = float(vals.std())
        out["num_views"] = len(rows)
        return out

    all_rows = [r for rows in per_scene.values() for r in rows]
    result = agg(all_rows)
    result["per_scene"] = {s: agg(rows) for s, rows in per_scene.items()}
    ok, reason = lpips_status()
    result["lpips_available"] = ok
    if not ok:
        result["lpips_note"] = reason
    return result
