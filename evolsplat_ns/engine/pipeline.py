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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from evolsplat_ns.data.types import Sample
from evolsplat_ns.engine import ns_hooks
from evolsplat_ns.engine.distributed import Distributed
from evolsplat_ns.engine.datamanager import SegmentImages
from evolsplat_ns.engine.evaluation import evaluate_held_out, image_writer, score_view
from evolsplat_ns.engine.stage2 import OnlineStage2Trainer
from evolsplat_ns.engine.stage2_strategies import make_controller
from evolsplat_ns.model.evolsplat_model import EmptySegmentError


MODEL_EXTRA_STATE = "_model._extra_state"
DATAMANAGER_EXTRA_STATE = "datamanager._extra_state"
"""Keys of the model's and the data manager's ``get_extra_state`` in the pipeline's state dict."""

SEGMENT_ENV = "EVOLSPLAT_SEGMENT"
"""Environment variable choosing the shown segment for stock tools that have no flag for it
(``EVOLSPLAT_SEGMENT=002/seg000 ns-render interpolate ...``); wins over ``shown_segment``."""


@dataclass
class EVolSplatPipelineConfig(VanillaPipelineConfig):
    """Connects the multi-scene data manager to the model (see the two sub-configs)."""

    _target: Type = field(default_factory=lambda: EVolSplatPipeline)
    viewer_controls: Optional[InstantiateConfig] = None
    """GUI elements for the nerfstudio viewer, built with ``setup(pipeline=...)`` (None = none)."""
    eval_composites: bool = False
    """``ns-eval --render-output-path`` also writes prediction | ground truth | error composites."""
    shown_segment: Optional[str] = None
    """Segment rendered for bare cameras after loading (viewer, ns-render, ns-export): a key such as
    ``002/seg000`` or a scene name (its first segment). Default: the first training segment that
    the checkpoint has a node for. The environment variable EVOLSPLAT_SEGMENT overrides it."""


class EVolSplatPipeline(VanillaPipeline):
    config: EVolSplatPipelineConfig

    def __init__(self, config: EVolSplatPipelineConfig, device: str,
                 test_mode: Literal["test", "val", "inference"] = "val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler: Optional[Any] = None) -> None:
        ns_hooks.install(EVolSplatPipeline)  # ns-eval / ns-viewer / ns-export: intact checkpoints, no overwrite
        # world_size 1: no DDP wrapper. Data parallel training averages gradients in the trainer
        # (evolsplat_ns.engine.distributed says why); the data manager shards by the process group.
        super().__init__(config, device, test_mode, 1, local_rank, grad_scaler)
        self.world_size = world_size
        self.model.segment_filter = self.datamanager.dataset.holds  # each rank loads only its segments
        # before the first segment is shown: building a segment may need its observations (stage 2's
        # flow discovery for a segment without box tracks)
        self.model.stage2_observations = self._segment_observations
        # A viewer renders bare cameras as soon as a browser connects (before any training step,
        # or right after ns-viewer loads a checkpoint), so there is always a context to render.
        self.shown: SegmentImages = self.datamanager.train_dataset
        self._chosen = self._chosen_segment()
        if self._chosen is not None:
            self.shown = SegmentImages.of_segment(self.datamanager.dataset, self._chosen)
            self._show(self.shown)
        else:
            self._show_first_nonempty()
        self.model.camera_renderer = self._render_named_camera
        self.stage2_warm_start = False
        """True after loading a checkpoint without stage-2 heads into a stage-2 method (stage-1 warm start)."""
        self._held_out: Optional[tuple[int, Any, Sample, Any]] = None
        """(eval index, context, sample, encoded state) of the held-out view rendered last by
        :meth:`_render_named_camera` (its sample's views share one encode, as in evaluation)."""
        if config.viewer_controls is not None:
            self.segments = config.viewer_controls.setup(pipeline=self)

    def get_training_callbacks(self, training_callback_attributes):
        """nerfstudio's callbacks, plus the stage-2 controller's when the model has a refiner."""
        callbacks = super().get_training_callbacks(training_callback_attributes)
        self.stage2_controller: Optional[OnlineStage2Trainer] = None
        if self.model.stage2 is not None:
            c = self.datamanager.config.dataset
            steps_per_epoch = len(self.datamanager.dataset.train_segment_ids) * c.iters_per_segment
            s2 = self.model.config.stage2
            self.stage2_controller = make_controller(s2.stage2_controller, s2, self.model,
                                                     training_callback_attributes.optimizers, steps_per_epoch)
            callbacks += self.stage2_controller.callbacks()
        return callbacks

    def _segment_observations(self, key):
        """The stage-2 processor's lazy depth / flow / images of segment ``key`` (None if the
        dataset does not have it, e.g. a checkpoint rendered on other data)."""
        dataset = self.datamanager.dataset
        try:
            return dataset.observations(dataset.segment_index(key))
        except KeyError:
            return None

    def _chosen_segment(self) -> Optional[int]:
        """Index of the segment named by $EVOLSPLAT_SEGMENT or ``shown_segment`` (None: not chosen)."""
        name = os.environ.get(SEGMENT_ENV) or self.config.shown_segment
        if not name:
            return None
        dataset = self.datamanager.dataset
        keys = [str(dataset.key(i)) for i in range(len(dataset.segments))]
        for i, key in enumerate(keys):
            if name in (key, key.split("/")[0]):
                return i
        source = f"${SEGMENT_ENV}" if os.environ.get(SEGMENT_ENV) else "pipeline.shown_segment"
        raise ValueError(f"{source}={name!r} names no segment under {dataset.config.data}; "
                         f"segments: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")

    def _render_named_camera(self, camera: Cameras) -> Optional[dict]:
        """Render a camera whose ``metadata`` names what it shows (the datasets' ``cameras``).

        ``eval_index`` + ``view``: that held-out view, exactly as the held-out loop renders it (its
        sample's context and sources, one shared encode per sample), so ``ns-render dataset
        --split test`` writes what ``ns-eval`` scores. ``segment_index``: shows that segment, then
        renders as usual. Other cameras (paths, the viewer) render in the shown context.
        """
        meta = camera.metadata or {}
        current = self._held_out is not None and self._held_out[1] is self.model.context
        if "eval_index" in meta:
            i, v = int(meta["eval_index"].reshape(-1)[0]), int(meta["view"].reshape(-1)[0])
            if not (current and self._held_out[0] == i):
                sample = self.datamanager.dataset.eval_sample(i)
                self.model.set_context(sample.key, sample.source, self.datamanager.point_cloud_for(sample))
                self._held_out = (i, self.model.context, sample, self.model.encode(split_backward=False))
            _, _, sample, state = self._held_out
            out = score_view(self.model, sample, state, v).outputs
            return {k: val for k, val in out.items() if k not in ("gaussians", "actors")}
        if "segment_index" in meta and int(meta["segment_index"].reshape(-1)[0]) != self.shown.segment_index:
            self.show_segment(int(meta["segment_index"].reshape(-1)[0]))
        elif current:
            self._show(self.shown)  # the last camera was a held-out view's: back to the shown context
        return None

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
        self.datamanager.show(images)
        self._held_out = None

    def set_render_time(self, fraction: Optional[float]) -> None:
        """Place moving actors at ``fraction`` (0..1) of the shown segment's time span in bare-camera
        renders (the viewer's time control); None: at the time of the source nearest the camera."""
        if fraction is None:
            self.model.render_time = None
            return
        frames = self.datamanager.dataset.segments[self.shown.segment_index].frames
        self.model.render_time = frames[0] + float(fraction) * (frames[-1] - frames[0])

    def set_render_num_sources(self, count: int) -> None:
        """How many nearest source views each bare-camera render uses (the viewer's slider)."""
        self.model.render_num_sources = count

    def load_pipeline(self, loaded_state: dict[str, Any], step: int) -> None:
        """Load a checkpoint, then show a segment on the loaded nodes: the one shown before if the
        checkpoint has its node, else the first segment it has one for. Loading adds no node: with
        none in the checkpoint, the context made at construction (its node built from the point
        cloud) stays as it is.

        A plain ``evolsplat`` checkpoint loads into ``evolsplat-stage2`` (a stage-1 warm start):
        stage 1 is restored and the stage-2 heads, absent from the checkpoint, keep their identity
        initialisation (``stage2_warm_start`` is then True and a line says so)."""
        self.stage2_warm_start = self.model.stage2 is not None and not any(
            k.removeprefix("module.").startswith("_model.stage2.") for k in loaded_state)
        super().load_pipeline(loaded_state, step)
        if self.stage2_warm_start:
            from nerfstudio.utils.rich_utils import CONSOLE

            CONSOLE.print(f"Stage-1 checkpoint (step {step}) loaded into a stage-2 method: the stage-2 heads start "
                          "at identity (an untrained stage 2 renders exactly stage 1)")
        dataset = self.datamanager.dataset
        with_node = [i for i in range(len(dataset.segments)) if dataset.key(i) in self.model.segments]
        if self._chosen is not None or self.shown.segment_index in with_node:
            self._show(self.shown)
        elif with_node:
            self.show_segment(with_node[0])
        if self.test_mode != "val":  # loaded for a tool (viewer, ns-render, ns-export), not for training
            self._announce_shown()

    def gathered_state_dict(self, dist: Distributed) -> Optional[dict[str, Any]]:
        """Collective (every rank calls it): on rank 0 its :meth:`state_dict` with every rank's
        segment states and data streams; None on the other ranks.

        Segments: the union of the ranks' stores (a key held by several ranks is taken from the
        rank that trains it). Data streams: ``{"world_size": W, "streams": [rank 0's, ...]}`` under
        the data manager's extra state (:meth:`EVolSplatDataManager.set_extra_state` reads both forms).
        """
        main = dist.world.is_main
        state = self.state_dict() if main else None
        own = self.model.segments.state_dict() if not main else None  # rank 0's are in ``state``
        segments = dist.gather_objects(own, "gathering every rank's segment states for a checkpoint")
        streams = dist.gather_objects(self.datamanager.get_extra_state(), "gathering the data streams")
        if not main:
            return None
        model_extra = state[MODEL_EXTRA_STATE]
        segments[0] = model_extra["segments"]
        owner = {str(k): r for k, r in self.datamanager.dataset.segment_owner.items()}
        merged: dict[str, dict] = {}
        for rank, held in enumerate(segments):
            for key, segment in held.items():
                if key not in merged or owner.get(key) == rank:
                    merged[key] = segment
        model_extra["segments"] = merged
        state[DATAMANAGER_EXTRA_STATE] = {"world_size": dist.world.size, "streams": streams}
        return state

    def _announce_shown(self) -> None:
        """Say which segment bare-camera tools render and export, and how to choose another."""
        from nerfstudio.utils.rich_utils import CONSOLE

        dataset, i = self.datamanager.dataset, self.shown.segment_index
        frames = dataset.segments[i].frames
        CONSOLE.print(f"EVolSplat shows segment {dataset.key(i)} (frames {frames[0]}-{frames[-1]}; poses in its "
                      f"first frame's vehicle frame): ns-render paths and ns-export use it; choose another "
                      f"with {SEGMENT_ENV}=SCENE/segNNN")

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
        """Metrics of every held-out view of every eval scene: per scene and mean, with a progress bar.

        With ``output_path`` (``ns-eval --render-output-path``), writes one image per output and
        view, ``{output_path}/{rgb,gt-rgb,depth,accumulation}/{scene}_{frame}_{cam}.png``, plus
        ``composite/`` (prediction | GT | error) when ``eval_composites`` is set.
        """
        on_view = image_writer(Path(output_path), self.config.eval_composites) if output_path is not None else None
        return evaluate_held_out(self.model, self.datamanager, on_view, get_std=get_std, progress=True)
