"""EVolSplat as a nerfstudio ``Model``: per-segment Gaussian nodes, feed-forward prediction, render.

The model owns the networks (:class:`GaussianPredictor`), the :class:`SegmentStore` (every
segment's node, offset cache, frozen volume and render caches) and a *context*: the segment
currently shown, with its pool of posed source views. A training or eval :class:`Sample` enters
through one route, :meth:`EVolSplatModel.sample_loss` (sources and targets together); bare cameras
(viewer, ``ns-render``) render through :meth:`get_outputs_for_camera` in the current context.

Frames: nerfstudio ``Cameras`` carry OpenGL camera-to-segment poses of the current context; they
are converted to OpenCV at :func:`evolsplat_ns.data.cameras.camera_to_opencv`. Everything else
here is OpenCV camera-to-segment and the segment frame.
"""

from __future__ import annotations

import warnings
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Callable, ContextManager, Literal, Optional, Type

import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.utils.colormaps import apply_depth_colormap
from torch.nn import Parameter

from evolsplat_ns import registry
from evolsplat_ns.data.actors import split_point_cloud
from evolsplat_ns.data.cameras import camera_to_opencv, reference_view
from evolsplat_ns.data.observations import FlowCache, SegmentObservations
from evolsplat_ns.data.types import PointCloud, Sample, SegmentKey, Views, rgb_float
from evolsplat_ns.geometry import invert_rigid
from evolsplat_ns.model.losses import entropy_loss
from evolsplat_ns.model.metrics import image_metrics, psnr
from evolsplat_ns.model.actors import ActorNodes
from evolsplat_ns.model.node import GaussianNode, GaussianParams
from evolsplat_ns.model.precision import full_precision
from evolsplat_ns.model.predictor import GaussianPredictor, PredictorConfig, SharedState, on_host
from evolsplat_ns.model.render.layers import Front, rasterize_layered, rasterize_layered_blocks
from evolsplat_ns.model.segment_store import SegmentState, SegmentStore
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.discovery import discover_objects
from evolsplat_ns.model.stage2.loss import stage2_loss_class
from evolsplat_ns.model.stage2.processor import OnlineDynamicProcessor
from evolsplat_ns.model.stage2.refiner import Stage2Refiner
from evolsplat_ns.model.stage2.step import FlowView, Stage2Report, Stage2Step
from evolsplat_ns.model.splatfacto_compat import SplatfactoSurface
from evolsplat_ns.model.state_cache import neighbour_count
from evolsplat_ns.utils.cuda_graphs import GraphCache
from evolsplat_ns.utils.timing import phase


@dataclass
class EVolSplatModelConfig(ModelConfig, PredictorConfig):
    """EVolSplat hyper-parameters (defaults as the paper's design). The network's own fields
    (sparseConv_outdim, local_radius, offset_max, num_neighbour_select, sh_degree, voxel_size,
    freeze_volume, enable_background, min_views, ...) come from :class:`PredictorConfig`."""

    _target: Type = field(default_factory=lambda: EVolSplatModel)
    rgb_loss: str = "l1_ssim"
    """Photometric loss, by registered name (entry-point group evolsplat_ns.losses)."""
    ssim_lambda: float = 0.2
    """Weight of the (1 - SSIM) term in the photometric loss."""
    entropy_loss: float = 0.1
    """Weight of the accumulation entropy loss (applied every ``entropy_loss_every`` steps)."""
    entropy_loss_every: int = 10
    """Steps between entropy-loss applications."""
    scale_init: float = 0.0
    """Initial Gaussian scale in metres; 0 = mean distance to the 3 nearest neighbours."""
    renderer: Literal["auto", "gsplat", "reference"] = "auto"
    """Rasteriser: gsplat (CUDA), the PyTorch reference, or auto (gsplat when on CUDA)."""
    normalize_background: bool = True
    """Divide the sky-dome render by its own accumulated opacity (where above 0.05): the dome is an
    opaque surface, and its Gaussians' falloff between centres would otherwise darken the sky and
    show the dome as a lattice of dots (False: the composite as before this setting existed)."""
    single_draw_background: bool = True
    """Rasterise the foreground and the background dome in one call (fewer launches and host syncs;
    equal to two draws up to the rasteriser's early stop behind near-opaque foreground, see
    ``model/render/layers.py``); False: two draws. Two draws anyway with ``sky_loss_weight`` > 0 or
    when densification needs the foreground's rasteriser meta."""
    sky_loss_weight: float = 0.0
    """Sky supervision (needs ``--pipeline.datamanager.dataset.load-sky-masks True``; 0 = off): on a
    target's sky-mask pixels the photometric loss is left out and replaced by this weight times the
    L1 between the background (sky dome) render alone and the image, so sky pixels supervise only
    the background model."""
    sky_opacity_weight: float = 0.0
    """Weight of the mean foreground opacity on sky-mask pixels (keeps Gaussians out of the sky;
    with ``sky_loss_weight``, needs the sky masks too)."""
    cuda_graphs: bool = True
    """On a GPU, replay fixed-shape work from captured CUDA graphs (one launch instead of tens to
    hundreds; the step is launch-bound, docs/performance.md): the sources' sky warp (captured once
    per image shape) and, in training with per-target backward, the photometric loss with its
    backward and the view-dependent heads with theirs (per padded row count up to
    ``predictor.MAX_GRAPH_ROWS``; renders replay the heads' forward alike). False: everything eager."""
    cuda_graph_render: bool = False
    """With ``cuda_graphs``, also replay a camera's whole decode (heads + warp) in no-grad renders
    (viewer, ``ns-eval`` images, camera paths), captured per encoded state and source set. Off by
    default: on an H200 it saved 0.3 ms of a 5.6 ms median frame but each capture (a new source set
    while the camera moves) costs a few frames, so a fly-through's mean rate fell."""
    batch_targets: bool = False
    """Training: draw a step's target views in one rasteriser call and back-propagate them with one
    backward (each target keeps its own view-dependent Gaussians: one call of the heads over every
    target's rows, and a draw in which each camera sees only its own rows). Fewer kernel launches
    and host syncs where the host bounds the step (~100k Gaussians per segment, docs/performance.md);
    every target's graph stays alive until that backward, so activation memory grows with the number
    of targets, which the per-target backward (False, the default) bounds to one. Per-target anyway
    while stage 2 refines and with ``sky_loss_weight`` > 0 (two draws per target)."""
    max_gaussians_per_segment: int = 0
    """Randomly subsample a segment's points to at most this many Gaussians (0 = all)."""
    max_points_per_actor: int = 5000
    """Randomly subsample each moving actor's object-frame points to at most this many (0 = all)."""
    segment_store_mb: float = 4096.0
    """Host memory (MiB) for the state of segments not being trained or shown; beyond it the least
    recently used spill to disk under the run folder (``segments/``) and load back when revisited
    (0 = unbounded)."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """The online stage-2 refiner of moving actors (off here; ``evolsplat-stage2`` turns it on)."""
    # nerfstudio's NeRF-era model fields: nothing here reads them (whole-camera rendering, no
    # rays, no collider, no coarse/fine losses, no text prompt), so they are off the command line.
    enable_collider: tyro.conf.Suppress[bool] = False
    collider_params: tyro.conf.Suppress[Optional[dict]] = None
    loss_coefficients: tyro.conf.Suppress[dict] = field(default_factory=dict)
    eval_num_rays_per_chunk: tyro.conf.Suppress[int] = 1 << 15
    prompt: tyro.conf.Suppress[Optional[str]] = None


STAGE2_FLOW_CACHE_BYTES = 512 * 2**20
"""Bound of the model's cache of stage-2 flow views (device memory): 960x640 flows are 4.9 MB
each, so about a hundred (frame, camera) views, several segments' worth at the demo's sizes."""


class EmptySegmentError(ValueError):
    """A segment whose point cloud has no points (the trainer skips it, counted and warned)."""


@dataclass
class SegmentContext:
    """What the model renders when asked for a camera without a batch.

    Attributes:
        key: the shown segment.
        sources: candidate source views (OpenCV camera-to-segment), on the model's device.
        segment: that segment's state, owned by the model's :class:`SegmentStore` (pinned there).
        source_poses: [V, 4, 4] ``sources.camtoworlds`` in host memory (view selection runs on
            the CPU: no kernel launches, no device sync).
        source_frame_ids: [V] ``sources.frame_ids`` in host memory (render times of bare cameras).
    """

    key: SegmentKey
    sources: Views
    segment: SegmentState = field(repr=False)
    source_poses: Optional[torch.Tensor] = field(default=None, repr=False)
    source_frame_ids: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source_poses is None:
            self.source_poses = on_host(self.sources.camtoworlds)
        if self.source_frame_ids is None:
            self.source_frame_ids = on_host(self.sources.frame_ids)

    @property
    def node(self) -> GaussianNode:
        return self.segment.node


@dataclass
class TargetLoss:
    """One target view's losses (already divided by the number of targets) and what it saw."""

    losses: dict[str, torch.Tensor]
    psnr: torch.Tensor
    """Detached PSNR (dB) of the rendered view."""
    index: torch.Tensor
    """[M] node indices of the Gaussians rendered for this target."""


@dataclass
class SampleLoss:
    """Outcome of :meth:`EVolSplatModel.sample_loss` over every target view of one sample.

    Attributes:
        losses: per-term totals (device scalars); detached when each target was back-propagated
            on its own, with their graph in the single-graph mode.
        psnr: mean PSNR (dB) over the targets that rendered (device scalar).
        projected_index: [M] unique node indices seen by any target (the offsets to commit).
        dropped_targets: target indices that saw no Gaussian (left out of the loss).
        state: the encoded shared state of the step.
    """

    losses: dict[str, torch.Tensor]
    psnr: torch.Tensor
    projected_index: torch.Tensor
    dropped_targets: list[int]
    state: SharedState

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values()) if self.losses else torch.zeros(())

    @property
    def nonfinite(self) -> bool:
        """Some target's loss was NaN/Inf: the step's gradients are unusable (the trainer drops
        them). Read once per step: it is the step's one host read of a loss value."""
        return not bool(torch.isfinite(self.total))


class PendingOffsets:
    """This step's predicted offsets, written to the segment's cache after the optimizer step by a
    ``TrainingCallback`` (so the per-step extra lives in nerfstudio's callback list, not the trainer)."""

    def __init__(self) -> None:
        self._pending: Optional[tuple[SharedState, torch.Tensor, Optional[torch.Tensor]]] = None

    def stage(self, state: SharedState, index: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Offsets of node Gaussians ``index`` [M] in ``state`` become the next commit. ``keep``
        (bool [] on the device): True keeps the cached offsets, for a step skipped on the device."""
        self._pending = (state, index, keep)

    def commit(self, step: int) -> None:
        """Write the staged offsets into the node's cache (recursive refinement); no-op if none."""
        if self._pending is not None:
            state, index, keep = self._pending
            offsets = state.offset.detach()[index]
            if keep is not None:
                cached = state.node.offset[index.to(state.node.offset.device)].to(offsets)
                offsets = torch.where(keep.to(offsets.device), cached, offsets)
            state.node.update_offset(index, offsets)
            self._pending = None

    def discard(self) -> None:
        self._pending = None


class EVolSplatModel(SplatfactoSurface):
    """EVolSplat. Derives from nerfstudio's ``Model`` through :class:`SplatfactoSurface` only so
    that nerfstudio's Gaussian-splatting tools (``ns-export gaussian-splat``, viewer) accept it."""

    config: EVolSplatModelConfig
    render_num_sources: Optional[int] = None
    """Source views per bare-camera render (the viewer's slider); None = ``num_neighbour_select``."""
    render_time: Optional[float] = None
    """Scene time (frame units) at which bare cameras place the actors (the viewer's time control);
    None = the frame of the source view nearest to the camera."""
    segment_filter: Optional[Callable[[SegmentKey], bool]] = None
    """Which segments' states :meth:`set_extra_state` loads from a checkpoint (set by the pipeline:
    a data-parallel rank loads only its own segments); None = all."""
    camera_renderer: Optional[Callable[[Cameras], Optional[dict]]] = None
    """Set by the pipeline for cameras whose ``metadata`` names a held-out view or a segment (the
    datasets' ``cameras``, e.g. in ``ns-render dataset``): renders a held-out view exactly as
    evaluation does, or makes the named segment the context; None = render in the context."""

    def populate_modules(self) -> None:
        self.predictor = GaussianPredictor(PredictorConfig(
            **{f.name: getattr(self.config, f.name) for f in fields(PredictorConfig)}))
        self.rgb_loss = registry.get("losses", self.config.rgb_loss)
        self._loss_graphs = GraphCache(capacity=4, grad=True)
        """Captured photometric loss + backward per image shape (``cuda_graphs``, :meth:`view_loss`)."""
        self.segments = SegmentStore(self.config.segment_store_mb)
        self.context: Optional[SegmentContext] = None
        self.offsets = PendingOffsets()
        self._batch_fallbacks: set[str] = set()
        """Why ``batch_targets`` fell back to per-target (each said once)."""
        self.step = 0
        s2 = self.config.stage2
        self.stage2 = Stage2Refiner(s2) if s2.enabled else None
        self.stage2_loss = stage2_loss_class(s2.stage2_loss)(s2) if s2.enabled else None
        self.stage2_processor = OnlineDynamicProcessor(s2) if s2.enabled else None
        self.stage2_observations: Optional[Callable[[SegmentKey], Optional[SegmentObservations]]] = None
        """Set by the pipeline: a segment's lazy depth / flow / images for the stage-2 processor."""
        self._objects_from: dict[str, str] = {}
        """Per segment built here without box tracks: what flow discovery found, or why it did not run."""
        self.stage2_started = False
        """Set by the stage-2 controller once the schedule has started (checkpointed): from then on
        every segment the model encodes is processed once (observed motion, fitted poses)."""
        self._stage2_process_s: dict[str, float] = {}
        self.stage2_active = False
        """Set before each training step by the stage-2 controller (:mod:`evolsplat_ns.engine.stage2`)."""
        self.stage2_step: Optional[Stage2Step] = None
        self.stage2_report: Optional[Stage2Report] = None
        """What the last scheduled stage-2 step did (None: not scheduled, or stage 1 failed first)."""
        self.stage2_counters: dict = {}
        """The stage-2 controller's counters, kept here so that checkpoints carry them."""
        self._flow_views: FlowCache[tuple[str, Optional[FlowView]]] = FlowCache(STAGE2_FLOW_CACHE_BYTES)
        """Stage 2's flow views by (segment, frame, camera), on the device: read from disk once."""

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = {"networks": list(self.predictor.parameters())}
        if self.stage2 is not None:  # only the heads its mode trains (the frozen head leaves the optimizer)
            groups["stage2"] = self.stage2.trainable_parameters()
        return groups

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> list[TrainingCallback]:
        """After each training iteration: commit the step's predicted offsets to the node cache."""
        return [TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.offsets.commit)]

    # -- segment state ---------------------------------------------------------------------------

    def segment_for(self, key: SegmentKey, point_cloud: Optional[PointCloud]) -> SegmentState:
        """The segment's stored state (its node built from ``point_cloud`` the first time)."""
        state = self.segments.get(key)
        if state is not None:
            return state
        if point_cloud is None:
            raise KeyError(f"segment {key} has no node yet and no point cloud was given")
        if len(point_cloud) == 0:
            raise EmptySegmentError(f"segment {key}: its point cloud is empty (no LiDAR/depth points "
                                    "survived filtering), so there is nothing to reconstruct")
        pc = _subsample(point_cloud, self.config.max_gaussians_per_segment, _stable_seed(key)).to(self.device)
        scale = "knn" if self.config.scale_init <= 0 else self.config.scale_init
        pc, origin = self._discover_objects(key, pc)
        actors = (ActorNodes.from_point_cloud(pc, self.config.max_points_per_actor, origin=origin)
                  if self.config.enable_actors else None)
        return self.segments.put(key, SegmentState(GaussianNode.from_point_cloud(pc, scale_init=scale), actors))

    def _discover_objects(self, key: SegmentKey, pc: PointCloud) -> tuple[PointCloud, str]:
        """``pc`` and where its actors come from. A segment without box tracks, with stage 2 on and
        ``discover_without_boxes``: stage 2's flow discovery runs once here (the segment is built
        once, then stored and checkpointed) and its pseudo-box tracks split the cloud by the same
        rule as box tracks, so stage 1 and the processor see actors as if the data had boxes. Its
        flow: the dataset's ``flow/``, else the processor's RAFT when trusted (the same flow the
        processor's aggregation then uses)."""
        s2 = self.config.stage2
        if pc.tracks or self.stage2_processor is None or not self.config.enable_actors:
            return pc, "box tracks"
        obs = self.stage2_observations(key) if self.stage2_observations is not None else None
        if not s2.discover_without_boxes:
            why = "none (no box tracks; discover_without_boxes is off)"
        elif obs is None:
            why = "none (no box tracks, and no observations of this segment to discover objects from)"
        elif pc.frame_ids is None:
            why = "none (no box tracks, and the point cloud has no per-point frame ids to split)"
        else:
            # without dataset flow/, the processor's RAFT (discovery refuses it untrusted)
            flow_model = self.stage2_processor.flow_model(self.device) if not obs.has_flow and obs.has_depth else None
            tracks, report = discover_objects(obs, s2, (pc.points, pc.frame_ids), self.device, flow_model)
            why = report.objects_from
            if tracks:
                pc = split_point_cloud(pc, tracks, s2.discovery_box_margin, s2.mask_ground_clearance)
        self._objects_from[str(key)] = why
        return pc, "flow discovery"  # the label of whatever actors the split made (none: no actors)

    def set_context(self, key: SegmentKey, sources: Views, point_cloud: Optional[PointCloud] = None) -> SegmentContext:
        """Make segment ``key`` (with candidate ``sources``) the one rendered for bare cameras.

        Its render caches start empty, so encoded states never outlive a training step. Only the
        context's segment lives on the model's device; the store keeps the others in host memory
        (or on disk), so memory does not grow with the number of segments a long run has visited.

        Once stage 2 has started, the segment is also processed here, once (:meth:`_observe_motion`,
        phase ``stage2_process``), so the step that meets it renders and encodes with its fitted
        poses and no stage-2 run has to wait for it.
        """
        with phase("prepare"):
            self.segment_for(key, point_cloud)
            self.context = SegmentContext(key, sources.to(self.device, non_blocking=True),
                                          self.segments.activate(key, self.device), on_host(sources.camtoworlds),
                                          on_host(sources.frame_ids))
        self._observe_motion(self.context)
        return self.context

    def forget_segments(self) -> None:
        """Drop every segment's state and the context, so scenes loaded afterwards start from their
        own point clouds even if their keys repeat a training scene's (zero-shot)."""
        self.segments.forget()
        self.context = None
        self._flow_views.clear()

    # -- prediction and rendering ----------------------------------------------------------------

    def encode(self, sources: Optional[Views] = None, split_backward: bool = True) -> SharedState:
        """Shared per-step state of the context segment (volume, window features, offsets), from
        ``sources`` (default: the context's, whose poses the context also holds on the host).

        With ``split_backward`` the shared outputs sit behind a gradient boundary: per-target
        backward passes stop there and ``state.backward_shared()`` finishes the step.
        """
        ctx = self._require_context()
        self._observe_motion(ctx)  # a no-op after set_context, unless stage 2 started since the context was set
        poses = ctx.source_poses if sources is None else None  # else copied back once (a sync)
        sources = sources if sources is not None else ctx.sources
        state = self.predictor.encode(ctx.node, sources, self._frozen_volume(ctx.segment), split_backward,
                                      actors=ctx.segment.actors, source_poses=poses,
                                      volume_cache=ctx.segment.volume_cache)
        if self.stage2 is not None and state.actors is not None and not torch.is_grad_enabled():
            # renders without a training graph (viewer, evaluation) show the refined actors too
            out = self.stage2(state.actors, state.actor_nodes, ctx.segment.motion)
            state.actors, state.actor_nodes = out.gaussians, state.actor_nodes.with_poses(out.poses, out.quats)
        return state

    def _observe_motion(self, ctx: SegmentContext) -> None:
        """Once stage 2 has started, process the context segment once (the processor's observed
        motion is cached on its state): from then on its actors are posed by the fitted trajectory
        (stage 1's windows, every render, the refiner's base), the boxes kept in ``motion.box_poses``.
        Runs from :meth:`set_context`, timed as phase ``stage2_process``; its component seconds go
        to the next stage-2 run's report (``process_s``), as the amortised share of the pass."""
        segment = ctx.segment
        if self.stage2_processor is not None and self.stage2_started and segment.actors is None:
            self.stage2_processor.objects_from = self._objects_from.get(str(ctx.key), "none (no box tracks in this segment)")
            self.stage2_processor.objects_discovered = 0
        if (self.stage2_processor is None or not self.stage2_started or segment.actors is None
                or segment.motion is not None):
            return
        with phase("stage2_process"):
            obs = self.stage2_observations(ctx.key) if self.stage2_observations is not None else None
            motion = self.stage2_processor.process(segment.actors, obs)
            segment.actors.repose(motion.poses)
            segment.motion = motion
            segment.clear_render_caches()
        for k, v in motion.times.items():
            self._stage2_process_s[k] = self._stage2_process_s.get(k, 0.0) + v

    def _start_stage2(self, state: SharedState, split_backward: bool) -> Optional[Stage2Step]:
        """Refine the step's actors when stage 2 is scheduled (the state then renders the refined
        Gaussians and corrected poses); records the outcome in ``stage2_report``."""
        self.stage2_step = self.stage2_report = None
        if self.stage2 is None or not self.stage2_active or not torch.is_grad_enabled():
            return None
        if state.actors is None or not self.stage2.objects(state.actor_nodes):
            self.stage2_report = Stage2Report("no_objects")
            return None
        try:
            step2 = Stage2Step(self.stage2, self.stage2_loss, state.actors, state.actor_nodes, split_backward,
                               self.context.segment.motion, self._stage2_process_s)
            self._stage2_process_s = {}
        except torch.cuda.OutOfMemoryError:  # stage 1 keeps stepping; the controller shrinks the budget
            self.stage2.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.stage2_report = Stage2Report("oom")
            return None
        state.actors, state.actor_nodes = step2.actors, step2.nodes
        self.stage2_step = step2
        return step2

    def _finish_stage2(self, step2: Optional[Stage2Step], backward, totals: dict[str, torch.Tensor]) -> None:
        """The per-step stage-2 terms and the refiner's backward, before the shared stage-1 part.

        Stage-2 steps read the device once here (:meth:`Stage2Step.finish`): a non-finite stage-2
        term leaves stage 2's part of the step out (its terms removed from ``totals``, its gradients
        dropped; stage 1 steps on); a non-finite stage-1 loss makes the trainer skip the whole step,
        reported as ``stage2_report = None``."""
        if step2 is None:
            return
        stage1_total = sum(v.detach() for v in totals.values()) if totals else None
        terms = step2.finish(backward, stage1_total)
        if not step2.stage1_finite:
            self.stage2_report = self.stage2_step = None
            return
        if step2.nonfinite:
            for k in [k for k in totals if k.startswith("s2_")]:
                del totals[k]
        for k, val in terms.items():
            totals[k] = totals[k] + val if k in totals else val
        self.stage2_report, self.stage2_step = step2.report(), None

    def _frozen_volume(self, segment: SegmentState):
        """The segment's frozen volume (built once) when ``freeze_volume``, else None (rebuilt per step)."""
        if not self.config.freeze_volume:
            return None
        if segment.frozen_volume is None:
            with phase("volume"):
                segment.frozen_volume = self.predictor.build_volume(segment.node).detach()
        return segment.frozen_volume

    def render(self, state: SharedState, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
               time: Optional[float] = None, reuse_graphs: bool = False) -> dict[str, torch.Tensor]:
        """Predict Gaussians for an OpenCV camera-to-segment pose at ``time`` and render them.

        ``c2w`` [4, 4] and ``K`` [3, 3] may be on the host (preferred in loops: the nearest sources
        are chosen there, with no device sync) or on the model's device. ``time`` (scene frame
        units, fractional allowed) places the moving actors by their box tracks; None renders the
        static scene only. Returns rgb [H, W, 3], depth [H, W, 1] (OpenCV z, metres), accumulation
        [H, W, 1], the static params under ``gaussians`` (offset cache, export) and the posed actor
        Gaussians under ``actors`` (None without).

        ``reuse_graphs`` (on a GPU with ``cuda_graphs``): the caller uses this render's outputs, and
        back-propagates them if it trains, before the next render. Fixed-shape work then replays
        CUDA graphs (:meth:`_decode`), whose output tensors the next such render overwrites:
        ``gaussians`` (no-grad renders) and what autograd saved of the sky warp (training).
        """
        views = self.predictor.nearest_views(state, c2w)
        c2w, K = c2w.to(self.device, non_blocking=True), K.to(self.device, non_blocking=True)
        with phase("heads"):
            params, sky = self._decode(state, views, c2w, K, width, height, reuse_graphs)
            actors = self.predictor.predict_actors(state, time)
            background = self.predictor.predict_background(state) if self.config.enable_background else None
        foreground = [params, actors] if actors is not None else params  # joined inside the draw
        out = self.rasterize_gaussians(foreground, background, c2w, K, width, height, sky=sky)
        out["gaussians"], out["actors"] = params, actors
        return out

    def render_targets(self, state: SharedState, targets: Views) -> list[dict[str, torch.Tensor]]:
        """:meth:`render` of every view of ``targets`` (OpenCV camera-to-segment poses, best on the
        host) at its frame time, in one call of the heads and one rasteriser call
        (``batch_targets``); always one draw of foreground and dome (``rasterize_layered_blocks``).
        Returns one dict per target, with the keys of :meth:`render`."""
        poses, Ks = on_host(targets.camtoworlds), on_host(targets.intrinsics)
        views = [self.predictor.nearest_views(state, c2w) for c2w in poses]
        c2ws, Ks = poses.to(self.device, non_blocking=True), Ks.to(self.device, non_blocking=True)
        W, H = targets.width, targets.height
        times = on_host(targets.frame_ids).tolist()
        with phase("heads"):
            params = self.predictor.predict_many(state, c2ws, Ks, views)
            skies = [self._sky(state, v, c2ws[i], Ks[i], W, H) for i, v in enumerate(views)]
            actors = [self.predictor.predict_actors(state, float(t)) for t in times]
            background = self.predictor.predict_background(state) if self.config.enable_background else None
        fronts = [[p, a] if a is not None else p for p, a in zip(params, actors)]
        sky = None if skies[0] is None else tuple(torch.stack(parts) for parts in zip(*skies))
        with torch.autocast(device_type=c2ws.device.type, enabled=False), phase("render"):
            image = rasterize_layered_blocks(
                [_fp32(f) for f in fronts], _fp32(background) if background is not None else None, c2ws.float(),
                Ks.float(), W, H, sh_degree=self.config.sh_degree, normalize=self.config.normalize_background,
                sky=sky, backend=self.config.renderer)
        return [{"rgb": image.rgb[i], "depth": image.depth[i], "accumulation": image.alpha[i],
                 "background_rgb": image.background[i] if background is not None else None,
                 "gaussians": params[i], "actors": actors[i]} for i in range(len(params))]

    def _sky(self, state: SharedState, views: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, width: int,
             height: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The sources' sky warp for one of several targets rendered together: a graph's outputs
        are copied out (the next target's replay overwrites them)."""
        graphed = self.config.cuda_graphs and c2w.is_cuda
        sky = self.predictor.predict_sky(state, views, c2w, K, width, height, graphed=graphed)
        return tuple(t.clone() for t in sky) if sky is not None and graphed else sky

    def _decode(self, state: SharedState, views: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, width: int,
                height: int, reuse_graphs: bool) -> tuple[GaussianParams, Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """The target's Gaussians and the sources' sky (``predict``, ``predict_sky``) for ``c2w`` [4, 4]
        (OpenCV camera-to-segment) and ``K`` [3, 3] on the device, ``views`` [S] host indices.

        With ``reuse_graphs`` (see :meth:`render`) the sky warp (no grad) replays a graph, and with
        ``cuda_graph_render`` a no-grad decode replays one captured from ``state`` as a whole (a
        camera's decode is a few hundred small kernels); otherwise the heads replay a graph of
        their forward (+ backward in training) per row count (``GaussianPredictor.predict``).
        On the CPU everything runs eagerly."""
        def decode(c2w: torch.Tensor, K: torch.Tensor, graphed: bool):
            return (self.predictor.predict(state, c2w, K, views, graphed=graphed),
                    self.predictor.predict_sky(state, views, c2w, K, width, height, graphed=graphed))

        if not (reuse_graphs and self.config.cuda_graphs and c2w.is_cuda):
            return decode(c2w, K, False)
        if not self.config.cuda_graph_render or torch.is_grad_enabled() or torch.is_autocast_enabled():
            # per call: the warp (no grad, no per-state input) and, under grad, the heads
            return decode(c2w, K, True)
        # What the decode caches on first use (it syncs or copies from the host) is built eagerly.
        self.predictor.view_inputs(state, views)
        state.selected_sources(views)
        return state.graphs((tuple(views.tolist()), width, height), lambda c, k: decode(c, k, False), (c2w, K),
                            c2w.device)

    def rasterize_gaussians(self, params: Front, background: Optional[GaussianParams], c2w: torch.Tensor,
                            K: torch.Tensor, width: int, height: int, with_meta: bool = False,
                            sky: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Rasterise existing Gaussians (segment frame; one set, or parts drawn as one such as the
        static scene and the posed actors, in one call so that depth order is right) for an OpenCV
        camera-to-segment pose, with ``background`` composited behind; ``sky`` (rgb [H, W, 3],
        weight [H, W]: ``GaussianPredictor.predict_sky``) replaces the background by that weight
        (fp32 like the rest). Returns rgb, depth, accumulation as :meth:`render`; with
        ``with_meta`` also the foreground's rasteriser ``meta`` (``RenderOutput.meta``:
        ``means2d`` [1, N, 2] whose gradient densification reads, ``radii`` [1, N]), N rows in
        ``params``' (parts') order."""
        c2w, K = c2w.to(self.device, non_blocking=True), K.to(self.device, non_blocking=True)
        # Rasterisation is numerically delicate (covariance inversion, compositing): always fp32.
        with torch.autocast(device_type=c2w.device.type, enabled=False), phase("render"):
            image = rasterize_layered(
                _fp32(params), _fp32(background) if background is not None else None, c2w.float(), K.float(),
                width, height, sh_degree=self.config.sh_degree, normalize=self.config.normalize_background,
                sky=sky, single_draw=self._single_draw(with_meta), backend=self.config.renderer)
        out = {"rgb": image.rgb, "depth": image.depth, "accumulation": image.alpha, "background_rgb": image.background}
        if with_meta:
            out["meta"] = image.meta
        return out

    def _single_draw(self, with_meta: bool) -> bool:
        """Foreground and dome in one rasteriser call (``single_draw_background``) unless the caller
        needs the foreground's own meta (densification reads its ``means2d`` gradient) or the sky
        loss reads the un-attenuated background on every sky pixel, opaque foreground included."""
        return self.config.single_draw_background and not with_meta and self.config.sky_loss_weight <= 0

    # -- the training/eval route: one sample, one loss loop ----------------------------------------

    def sample_loss(self, sample: Sample, point_cloud: Optional[PointCloud], step: int,
                    backward: Optional[Callable[[torch.Tensor], None]] = None,
                    autocast: Callable[[], ContextManager] = nullcontext) -> SampleLoss:
        """Losses of every target view of ``sample`` (its segment becomes the context).

        With ``backward`` (e.g. ``lambda loss: scaler.scale(loss).backward()``) each target's loss is
        back-propagated on its own and its graph freed before the next, then the shared encode part
        once (``state.backward_shared``); without it every target stays in one graph (the caller
        back-propagates ``result.total``). Both give the same gradients (chain rule linearity); so
        does ``batch_targets``, where the targets are drawn together and back-propagated at once.
        ``autocast`` wraps the forward passes (mixed precision); rasterisation stays fp32.
        """
        with autocast():
            self.set_context(sample.key, sample.source, point_cloud)  # phases "prepare" and "stage2_process"
            state = self.encode(split_backward=backward is not None)
            step2 = self._start_stage2(state, split_backward=backward is not None)
        # Poses stay on the host (view selection there); images go to the device without blocking.
        targets = replace(sample.target, images=rgb_float(sample.target.images.to(self.device, non_blocking=True)))
        totals: dict[str, torch.Tensor] = {}
        psnrs, seen, dropped = [], [], []
        batched = (self._batched_losses(state, targets, step, backward, autocast)
                   if self._batch_targets(backward) else None)
        for v in range(len(targets)):
            if batched is not None:
                result = batched[v]
            else:
                with autocast():
                    result = self.target_loss(state, targets, v, step, graphed=backward is not None)
            if result is None:
                dropped.append(v)
                continue
            if backward is not None and batched is None:
                # A NaN/Inf loss is back-propagated like any other and caught once per step
                # (SampleLoss.nonfinite): a check per target would sync the device per target.
                with phase("backward"):
                    backward(sum(result.losses.values()))
                result.losses = {k: val.detach() for k, val in result.losses.items()}
            for k, val in result.losses.items():
                totals[k] = totals[k] + val if k in totals else val
            psnrs.append(result.psnr)
            seen.append(result.index)
            del result  # free this target's graph before the next
        with phase("backward"):
            self._finish_stage2(step2, backward, totals)
        if backward is not None and seen:
            with phase("backward"):
                state.backward_shared()
        mean_psnr = torch.stack(psnrs).mean() if psnrs else torch.tensor(float("nan"))
        return SampleLoss(totals, mean_psnr, _union(seen, self.device), dropped, state)

    def _batch_targets(self, backward: Optional[Callable[[torch.Tensor], None]]) -> bool:
        """Whether this training step draws its targets together (``batch_targets``): not while
        stage 2 refines (its terms are per target) nor with the sky loss (two draws per target)."""
        if not (self.config.batch_targets and backward is not None):
            return False
        why = ("stage 2 refines this step (its terms are per target)" if self.stage2_step is not None else
               "sky_loss_weight > 0 (two draws per target)" if not self._single_draw(with_meta=False) else None)
        if why is not None and why not in self._batch_fallbacks:
            self._batch_fallbacks.add(why)
            warnings.warn(f"pipeline.model.batch_targets is on, but {why}: these steps render their targets "
                          "one by one with per-target backward")
        return why is None

    def _batched_losses(self, state: SharedState, targets: Views, step: int, backward: Callable[[torch.Tensor], None],
                        autocast: Callable[[], ContextManager]) -> list[Optional[TargetLoss]]:
        """Every target's :class:`TargetLoss` (None for one that saw no Gaussian) from one draw
        (:meth:`render_targets`), back-propagated together once; the losses come back detached."""
        with autocast():
            outs = self.render_targets(state, targets)
        rgb_losses = self.batched_rgb_losses(outs, targets)
        with autocast():
            results = [self.score_target(out, targets, v, step, rgb_loss=None if rgb_losses is None else rgb_losses[v])
                       for v, out in enumerate(outs)]
        kept = [r for r in results if r is not None]
        if kept:
            with phase("backward"):
                backward(sum(sum(r.losses.values()) for r in kept))
        for r in kept:
            r.losses = {k: val.detach() for k, val in r.losses.items()}
        return results

    def batched_rgb_losses(self, outs: list[dict[str, torch.Tensor]], targets: Views) -> Optional[torch.Tensor]:
        """[C] photometric losses of the C renders ``outs`` of ``targets`` (:meth:`render_targets`)
        from one CUDA graph of all C losses and their backward, captured per image-stack shape
        (C SSIMs are a few hundred small kernels); None, for :meth:`view_loss`'s own, on the CPU,
        without ``cuda_graphs`` or with sky masks."""
        rgb = torch.stack([out["rgb"] for out in outs])  # [C, H, W, 3]
        sky_masked = targets.sky_masks is not None and (self.config.sky_loss_weight > 0
                                                        or self.config.sky_opacity_weight > 0)  # as sky_mask
        if not (self.config.cuda_graphs and rgb.is_cuda and rgb.requires_grad) or sky_masked:
            return None
        lam, gt = self.config.ssim_lambda, targets.images
        key = ("targets", self.config.rgb_loss, lam, tuple(rgb.shape), rgb.dtype, gt.dtype)
        with full_precision(gt.device):
            return self._loss_graphs(key, lambda p, g: torch.stack([self.rgb_loss(a, b, lam) for a, b in zip(p, g)]),
                                     (rgb, gt), rgb.device)

    def target_loss(self, state: SharedState, targets: Views, v: int, step: int,
                    graphed: bool = False) -> Optional[TargetLoss]:
        """Render target view ``v`` of ``targets`` and score it against its image (on the model's
        device; poses on the host or the device); None when it sees no Gaussian. Losses are divided
        by ``len(targets)`` (a step's loss is the mean over targets) and computed in fp32.
        ``graphed``: the caller back-propagates this target's loss before the next (see :meth:`view_loss`)."""
        out = self.render(state, targets.camtoworlds[v], targets.intrinsics[v], targets.width, targets.height,
                          time=float(targets.frame_ids[v]), reuse_graphs=graphed)
        return self.score_target(out, targets, v, step, graphed)

    def score_target(self, out: dict[str, torch.Tensor], targets: Views, v: int, step: int,
                     graphed: bool = False, rgb_loss: Optional[torch.Tensor] = None) -> Optional[TargetLoss]:
        """:meth:`target_loss` of a render ``out`` of target view ``v`` (None when it saw no
        Gaussian); ``rgb_loss`` as :meth:`image_losses` takes it."""
        if len(out["gaussians"]) == 0:
            return None
        gt = targets.images[v]
        with full_precision(gt.device):  # SSIM's variance terms cancel catastrophically below fp32
            terms = self.image_losses(out, gt, step, self.sky_mask(targets, v), graphed=graphed, rgb_loss=rgb_loss)
            losses = {k: val / len(targets) for k, val in terms.items()}
            if self.stage2_step is not None:
                depth = targets.depths[v] if targets.depths is not None else None
                if depth is not None and depth.device.type == "cpu" and not bool((depth > 0).any()):
                    depth = None  # no ground truth in this view (checked on the host: no device read)
                depth = depth.to(self.device, non_blocking=True) if depth is not None else None
                losses.update(self.stage2_step.target_terms(out, gt, depth, step, len(targets),
                                                            self._flow_view(targets, v)))
        return TargetLoss(losses, psnr(out["rgb"].detach().float(), gt), out["gaussians"].index)

    def image_losses(self, outputs: dict[str, torch.Tensor], gt: torch.Tensor, step: int,
                     sky: Optional[torch.Tensor] = None, graphed: bool = False,
                     rgb_loss: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Loss terms of one rendered view against ``gt`` [H, W, 3]: :meth:`view_loss`, and with a sky
        mask ``sky`` [H, W] (:meth:`sky_mask`) the sky terms, the sky pixels then adding no
        photometric gradient (the image itself stands in for the composite there). Training and
        ``evolsplat-finetune`` both use it. ``rgb_loss``: the photometric term, computed already
        (:meth:`batched_rgb_losses`; only without a sky mask)."""
        shown = outputs if sky is None else {**outputs, "rgb": torch.where(sky[..., None], gt, outputs["rgb"])}
        terms = self.view_loss(shown, gt, step, graphed, rgb_loss=rgb_loss)
        if sky is not None:
            terms.update(self.sky_losses(outputs, gt, sky))
        return terms

    def sky_mask(self, targets: Views, v: int) -> Optional[torch.Tensor]:
        """Target ``v``'s sky mask [H, W] bool on the device when sky supervision is on, else None
        (also None, with one warning, when the samples carry no sky masks)."""
        if self.config.sky_loss_weight <= 0 and self.config.sky_opacity_weight <= 0:
            return None
        if targets.sky_masks is None:
            if not getattr(self, "_warned_no_sky", False):
                self._warned_no_sky = True
                warnings.warn("sky_loss_weight/sky_opacity_weight are set but the samples have no sky masks: "
                              "pass --pipeline.datamanager.dataset.load-sky-masks True (scenes need sky_masks/); "
                              "sky supervision is off")
            return None
        return targets.sky_masks[v].to(self.device, non_blocking=True)

    def sky_losses(self, outputs: dict[str, torch.Tensor], gt: torch.Tensor, sky: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sky terms of one target: background-only L1 and foreground opacity on sky pixels ``sky`` [H, W]."""
        m = sky[..., None].to(gt.dtype)
        n = m.sum().clamp(min=1.0)
        losses = {}
        if self.config.sky_loss_weight > 0 and outputs.get("background_rgb") is not None:
            err = (outputs["background_rgb"] - gt).abs() * m
            losses["sky_loss"] = self.config.sky_loss_weight * err.sum() / (3 * n)
        if self.config.sky_opacity_weight > 0:
            losses["sky_opacity_loss"] = self.config.sky_opacity_weight * (outputs["accumulation"] * m).sum() / n
        return losses

    def _flow_view(self, targets: Views, v: int) -> Optional[FlowView]:
        """Trusted flow from target ``v``'s frame to the next of its camera, for the stage-2
        consistency term: the dataset's flow/ (a real observation); None (and the loss status says
        why) without it, when the weight is 0, or at the segment's last frame. Each (segment, frame,
        camera) is read from disk and moved to the device once (``_flow_views``, bounded)."""
        loss = self.stage2_loss
        if loss is None or self.config.stage2.consistency_loss_weight <= 0:
            return None
        ctx = self._require_context()
        t, cam = int(targets.frame_ids[v]), int(targets.cam_ids[v])
        status, view = self._flow_views.get((ctx.key, t, cam), lambda: self._load_flow_view(ctx, t, cam))
        loss.consistency_status = status
        return view

    def _load_flow_view(self, ctx: SegmentContext, t: int, cam: int) -> tuple[tuple[str, Optional[FlowView]], int]:
        """(consistency status, flow view or None) of camera ``cam`` at frame ``t`` and its bytes."""
        obs = self.stage2_observations(ctx.key) if self.stage2_observations is not None else None
        if obs is None or not obs.has_flow:
            return ("off (no dataset flow/ for this segment; RAFT flow never supervises a loss here)", None), 0
        status = "on (dataset flow)"
        frames = ctx.segment.actors.frames.tolist() if ctx.segment.actors is not None else []
        if t + 1 not in obs.frames or t not in frames or t + 1 not in frames:
            return (status, None), 0  # the segment's last frame has no next one
        pair = obs.pair(t, cam, depth=False)
        to = lambda x: x.to(self.device)  # noqa: E731
        view = FlowView(to(pair.flow), frames.index(t), to(pair.view_t.K), to(invert_rigid(pair.view_t.c2w)),
                        to(invert_rigid(pair.view_t1.c2w)))
        return (status, view), view.flow.numel() * view.flow.element_size()

    def view_loss(self, outputs: dict[str, torch.Tensor], gt: torch.Tensor, step: int,
                  graphed: bool = False, rgb_loss: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Loss of one target view: photometric (+ entropy on accumulation every N steps).

        ``graphed`` (the caller back-propagates each view's loss before computing the next, as the
        per-target backward does): on a GPU with ``cuda_graphs`` the photometric loss and its
        backward replay a CUDA graph captured per image shape (SSIM is ~60 small kernels).
        ``rgb_loss`` given: that photometric term (:meth:`batched_rgb_losses`) instead."""
        rgb, lam = outputs["rgb"], self.config.ssim_lambda
        if rgb_loss is None and graphed and self.config.cuda_graphs and rgb.is_cuda and rgb.requires_grad:
            key = (self.config.rgb_loss, lam, tuple(rgb.shape), rgb.dtype, gt.dtype)
            rgb_loss = self._loss_graphs(key, lambda p, g: self.rgb_loss(p, g, lam), (rgb, gt), rgb.device)
        elif rgb_loss is None:
            rgb_loss = self.rgb_loss(rgb, gt, lam)
        losses = {"rgb_loss": rgb_loss}
        if self.config.entropy_loss > 0 and step % self.config.entropy_loss_every == 0:
            losses["entropy_loss"] = self.config.entropy_loss * entropy_loss(outputs["accumulation"])
        return losses

    # -- bare cameras (viewer, ns-render, ns-eval's single images) -------------------------------

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> dict[str, torch.Tensor]:
        """Render a nerfstudio camera (OpenGL camera-to-segment of the current context); no batch.

        Uses the ``render_num_sources`` context sources nearest to the camera. Their encoded state
        is cached on the segment, so while those sources stay the nearest (a viewer moving the
        camera) a frame only re-runs ``predict`` and rasterisation.
        Returns rgb [H, W, 3], depth [H, W, 1] (OpenCV z, metres), accumulation [H, W, 1].
        """
        if self.camera_renderer is not None and (out := self.camera_renderer(camera)) is not None:
            return out
        c2w, K, W, H = camera_to_opencv(camera, "cpu")  # host: nearest sources chosen there
        ctx = self._require_context()
        with neighbour_count(self.predictor.projector, self.render_num_sources):
            out = self.render(self._encode_nearest(ctx, c2w), c2w, K, W, H, time=self._render_time(ctx, camera, c2w),
                              reuse_graphs=True)
        return {k: v for k, v in out.items() if k not in ("gaussians", "actors", "background_rgb")}

    def _render_time(self, ctx: SegmentContext, camera: Cameras, c2w: torch.Tensor) -> float:
        """When a bare camera is rendered: ``render_time`` if set (the viewer's time control), else
        the camera's ``metadata["time"]``, else the frame of the source view nearest to it."""
        if self.render_time is not None:
            return float(self.render_time)
        if camera.metadata and "time" in camera.metadata:
            return float(torch.as_tensor(camera.metadata["time"]).reshape(-1)[0])
        nearest = self.predictor.projector.select_views(on_host(c2w), ctx.source_poses)[0]
        return float(ctx.source_frame_ids[nearest])

    def _encode_nearest(self, ctx: SegmentContext, c2w: torch.Tensor) -> SharedState:
        """Encoded state of ``ctx``'s sources nearest to ``c2w`` [4, 4] (OpenCV camera-to-segment),
        from the segment's render cache when the same sources were encoded at this step before."""
        chosen = self.predictor.projector.select_views(on_host(c2w), ctx.source_poses).sort().values
        key = (self.step, tuple(chosen.tolist()))

        return ctx.segment.encoded.get_or_build(
            key, lambda: self.encode(ctx.sources.select(chosen.to(self.device, non_blocking=True))))

    def get_outputs(self, ray_bundle) -> dict[str, torch.Tensor]:
        if isinstance(ray_bundle, Cameras):
            return self.get_outputs_for_camera(ray_bundle)
        raise TypeError("EVolSplatModel renders whole cameras; ray bundles are not supported")

    # -- nerfstudio's metric hooks -----------------------------------------------------------------

    def get_metrics_dict(self, outputs, batch) -> dict[str, torch.Tensor]:
        return {"psnr": image_metrics(outputs["rgb"], batch["image"].to(self.device), lpips=False)["psnr"]}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> dict[str, torch.Tensor]:
        return self.view_loss(outputs, batch["image"].to(self.device), self.step)

    def get_image_metrics_and_images(self, outputs, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        gt = batch["image"].to(self.device)[..., :3]
        pred = outputs["rgb"].clamp(0, 1)
        metrics = image_metrics(pred, gt)
        err = (pred - gt).abs().mean(-1, keepdim=True).expand_as(pred)
        images = {"img": torch.cat([pred, gt, err], dim=1),
                  "depth": apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
                  "accumulation": outputs["accumulation"].expand_as(pred)}
        return metrics, images

    # -- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        """Every segment's state (node + offset cache, frozen volume) travels in checkpoints."""
        extra = {"segments": self.segments.state_dict(), "step": self.step}
        if self.stage2 is not None:
            extra["stage2_point_budget"] = self.stage2.point_budget
            extra["stage2_counters"] = self.stage2_counters
            extra["stage2_started"] = self.stage2_started
        return extra

    def set_extra_state(self, state: dict) -> None:
        segments = state["segments"] if "segments" in state else _legacy_segments(state)
        if self.segment_filter is not None:
            segments = {k: s for k, s in segments.items() if self.segment_filter(SegmentKey.parse(k))}
        self.segments.load_state_dict(segments)
        if self.context is not None and self.context.key in self.segments:  # keep the shown segment renderable
            self.set_context(self.context.key, self.context.sources)
        # Otherwise the shown segment is not in the checkpoint: it keeps rendering from the state it
        # was built with (loading adds no segment) until another segment is shown.
        self.step = state.get("step", 0)
        if self.stage2 is not None and "stage2_point_budget" in state:
            self.stage2.point_budget = int(state["stage2_point_budget"])
            self.stage2_counters = state.get("stage2_counters", {})
            self.stage2_started = bool(state.get("stage2_started", False))

    def _require_context(self) -> SegmentContext:
        if self.context is None:
            raise RuntimeError("no segment selected: call set_context(...) (the pipeline does this "
                               "when training, evaluating or when the viewer picks a segment)")
        return self.context

    @torch.no_grad()
    def snapshot_gaussians(self) -> GaussianParams:
        """Foreground Gaussians of the shown segment, predicted for its reference view (first FRONT
        source view); cached until the context or the training step changes."""
        ctx = self._require_context()
        if ctx.segment.snapshot is None or ctx.segment.snapshot[0] != self.step:
            v = reference_view(ctx.sources)
            c2w, K = ctx.sources.camtoworlds[v], ctx.sources.intrinsics[v]
            state = self.encode(self.predictor.select_sources(ctx.sources, c2w), split_backward=False)
            ctx.segment.snapshot = (self.step, self.predictor.predict(state, c2w, K))
        return ctx.segment.snapshot[1]


def _fp32(g: Front) -> Front:
    """The rasterised fields of ``g`` (or of each of its parts) in float32 (autocast may have
    produced half precision)."""
    if isinstance(g, (list, tuple)):
        return [_fp32(p) for p in g]
    return GaussianParams(g.means.float(), g.quats.float(), g.scales.float(), g.opacities.float(), g.sh.float())


def _union(indices: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sorted unique node indices of several [M_i] index tensors. Targets that chose the same
    sources share one index tensor (``GaussianPredictor.view_inputs``), which is already sorted
    and unique: then nothing is computed (``torch.unique`` would sync the device)."""
    distinct = list({id(i): i for i in indices}.values())
    if not distinct:
        return torch.zeros(0, dtype=torch.long, device=device)
    return distinct[0] if len(distinct) == 1 else torch.unique(torch.cat(distinct))


def _legacy_segments(state: dict) -> dict[str, dict]:
    """Checkpoints written before the segment store kept nodes and frozen volumes apart."""
    volumes = state.get("frozen_volumes", {})
    return {key: {"node": node, "frozen_volume": volumes.get(key)} for key, node in state.get("nodes", {}).items()}


def _stable_seed(key: SegmentKey) -> int:
    """Process-independent seed from a segment key (Python's hash() is salted per process)."""
    return zlib.crc32(str(key).encode()) & 0x7FFFFFFF


def _subsample(pc: PointCloud, max_points: int, seed: int) -> PointCloud:
    if max_points <= 0 or len(pc) <= max_points:
        return pc
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pc), generator=g)[:max_points].to(pc.points.device)
    return replace(pc, points=pc.points[idx], colors=pc.colors[idx], metadata={**pc.metadata, "subsampled_to": max_points},
                   frame_ids=pc.frame_ids[idx] if pc.frame_ids is not None else None)
