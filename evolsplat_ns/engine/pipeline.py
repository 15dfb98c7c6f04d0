"""The EVolSplat pipeline: connects the data manager's samples to the model.

Training's inner loop (one backward per target view) is the model's ``sample_loss`` driven by
:mod:`evolsplat_ns.engine.trainer`; this class keeps a segment shown for bare-camera renders
(viewer, ``ns-render``), offers the single-graph loss, and evaluates through the one held-out loop
of :mod:`evolsplat_ns.engine.evaluation`.

The viewer's GUI is injected, not imported: ``viewer_controls`` is a config whose ``setup`` builds
the controls (``evolsplat_ns.viewer.controls.SegmentControlsConfig`` in the method configs), so
this engine layer never imports the viewer layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Type

import torch
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from evolsplat_ns.data.types import Sample
from evolsplat_ns.engine import ns_hooks
from evolsplat_ns.engine.datamanager import SegmentImages
from evolsplat_ns.engine.evaluation import HeldOutView, evaluate_held_out, score_view
from evolsplat_ns.model.evolsplat_model import EmptySegmentError


@dataclass
class EVolSplatPipelineConfig(VanillaPipelineConfig):
    _target: Type = field(default_factory=lambda: EVolSplatPipeline)
    viewer_controls: Optional[InstantiateConfig] = None
    """GUI elements for the nerfstudio viewer, built with ``setup(pipeline=...)`` (None = none)."""


class EVolSplatPipeline(VanillaPipeline):
    config: EVolSplatPipelineConfig

    def __init__(self, config: EVolSplatPipelineConfig, device: str,
                 test_mode: Literal["test", "val", "inference"] = "val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler: Optional[Any] = None) -> None:
        ns_hooks.install(EVolSplatPipeline)  # ns-eval / ns-viewer / ns-export: intact checkpoints, no overwrite
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        # A viewer renders bare cameras as soon as a browser connects (before any training step,
        # or right after ns-viewer loads a checkpoint), so there is always a context to render.
        self.shown: SegmentImages = self.datamanager.train_dataset
        self._show_first_nonempty()
        if config.viewer_controls is not None:
            self.segments = config.viewer_controls.setup(pipeline=self)

    def show_segment(self, segment_index: int) -> SegmentImages:
        """Make segment ``segment_index`` (of ``datamanager.dataset.segments``) the rendered context,
        with all its keyframe views as the source pool; returns those views (viewer frustums)."""
        self._show(SegmentImages.of_segment(self.datamanager.dataset, segment_index))
        return self.shown

    def _show_first_nonempty(self) -> None:
        """Show the first training segment with points. An empty one is not an error here: training
        skips it like any other empty segment (counted against the skip limit)."""
        dataset = self.datamanager.dataset
        for n, segment_index in enumerate(dataset.train_segment_ids):
            images = self.shown if n == 0 else SegmentImages.of_segment(dataset, segment_index)
            try:
                self._show(images)
                return
            except EmptySegmentError as e:
                print(f"{e}; the viewer shows the next segment, training skips this one", flush=True)

    def _show(self, images: SegmentImages) -> None:
        point_cloud = self.datamanager.dataset.point_cloud(images.segment_index)
        self.model.set_context(images.sample.key, images.sample.source, point_cloud)
        self.shown = images

    def set_render_num_sources(self, count: int) -> None:
        """How many nearest source views each bare-camera render uses (the viewer's slider)."""
        self.model.render_num_sources = count

    def load_pipeline(self, loaded_state: dict[str, Any], step: int) -> None:
        """Load a checkpoint, then show a segment on the loaded nodes: the one shown before if the
        checkpoint has its node, else the first segment it has one for. Loading adds no node: with
        none in the checkpoint, the context made at construction (its node built from the point
        cloud) stays as it is."""
        super().load_pipeline(loaded_state, step)
        dataset = self.datamanager.dataset
        with_node = [i for i in range(len(dataset.segments)) if dataset.key(i) in self.model.segments]
        if self.shown.segment_index in with_node:
            self._show(self.shown)
        elif with_node:
            self.show_segment(with_node[0])

    def sample_loss(self, sample: Sample, batch: dict, step: int) -> tuple[dict, dict]:
        """Losses over all target views of ``sample`` in one graph (mean over targets)."""
        result = self.model.sample_loss(sample, batch.get("point_cloud"), step)
        return result.losses, {"psnr": result.psnr}

    def get_train_loss_dict(self, step: int):
        """Single-graph variant of a training step's losses (the trainer uses per-target backward)."""
        sample, batch = self.datamanager.next_train(step)
        losses, metrics = self.sample_loss(sample, batch, step)
        return {}, losses, metrics

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        self.eval()
        sample, batch = self.datamanager.next_eval(step)
        losses, metrics = self.sample_loss(sample, batch, step)
        self.train()
        return {}, losses, metrics

    @torch.no_grad()
    def get_eval_image_metrics_and_images(self, step: int):
        """The first view of the next eval sample, scored as the held-out loop scores it."""
        self.eval()
        sample, batch = self.datamanager.next_eval_image(step)
        self.model.set_context(sample.key, sample.source, batch.get("point_cloud"))
        view = score_view(self.model, sample, self.model.encode(split_backward=False), 0)
        view.metrics["num_rays"] = sample.target.height * sample.target.width
        self.train()
        return view.metrics, view.images

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> dict:
        """Metrics of every held-out view of every eval scene: per scene and mean.

        With ``output_path``, writes ``{scene}_{frame}_{cam}.png`` grids (prediction | GT | error).
        """
        on_view = (lambda view: _save_grid(Path(output_path), view)) if output_path is not None else None
        return evaluate_held_out(self.model, self.datamanager, on_view, get_std=get_std)


def _save_grid(folder: Path, view: HeldOutView) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    grid = view.images["img"]
    Image.fromarray((grid.clamp(0, 1) * 255).byte().cpu().numpy()).save(folder / f"{view.name}.png")
