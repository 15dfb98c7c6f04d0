"""EVolSplat's feed-forward Gaussian predictor: node + source views -> Gaussians for a target camera.

One training step is ``state = encode(node, source)`` (shared work: sparse volume, volume features,
offsets, source-view window features, sky dome), then for every target ``predict(state, c2w, K)``
(view-dependent heads only) and ``predict_background(state)``.

Per-target backward without ``retain_graph``: ``encode`` cuts its differentiable outputs (volume
features and offsets) at a ``detach().requires_grad_()`` boundary. Each target's ``loss.backward()``
then frees only its own small graph and accumulates gradients on the boundary tensors;
``state.backward_shared()`` pushes the accumulated gradients through the shared graph (sparse U-Net,
offset head) once at the end. By linearity of the chain rule this equals one backward of the summed
loss, while the expensive shared part is computed and backpropagated once per step. With
``encode(..., split_backward=False)`` there is no boundary (one combined loss, a single backward).

Frames: node positions and Gaussians in the **segment frame**; cameras OpenCV camera-to-segment.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Literal, Optional, Sequence, get_args

import torch
from torch import nn

from evolsplat_ns.data.types import Views
from evolsplat_ns.model.actors import ActorGaussians, ActorHead, ActorNodes, place_actors, sample_actor_windows
from evolsplat_ns.model.background import BackgroundModel, SkyDome
from evolsplat_ns.model.heads import (
    ColorHead,
    OffsetHead,
    OpacityHead,
    ScaleRotationHead,
    ViewDecoder,
    aggregate_views,
    bucket_rows,
)
from evolsplat_ns.model.node import GaussianNode, GaussianParams
from evolsplat_ns.model.precision import full_precision, sparse_conv_precision
from evolsplat_ns.model.projector import ProjectedFeatures, Projector
from evolsplat_ns.model.sky_warp import source_stack, warp_stack_at_infinity
from evolsplat_ns.model.sparse_volume import SparseCostRegNet, SparseVolume, build_volume
from evolsplat_ns.model.volume_cache import VolumeIndexCache
from evolsplat_ns.utils.cuda_graphs import GraphCache
from evolsplat_ns.utils.timing import phase


VolumeFrom = Literal["current", "anchors"]
VOLUME_FROM = get_args(VolumeFrom)
"""Values of :attr:`PredictorConfig.volume_from`."""


@dataclass
class PredictorConfig:
    """Hyper-parameters of :class:`GaussianPredictor` (EVolSplat defaults)."""

    sparseConv_outdim: int = 32
    """Channels of the sparse volume's output features."""
    local_radius: int = 1
    """Image windows are (2r+1)^2 pixels."""
    offset_max: float = 0.1
    """Largest position offset per axis (metres)."""
    num_neighbour_select: int = 4
    """Source views used per target (nearest cameras)."""
    sh_degree: int = 1
    """Spherical-harmonics degree of the predicted Gaussian colours (0 = view-independent)."""
    voxel_size: float = 0.1
    """Sparse volume voxel edge (metres)."""
    volume_from: VolumeFrom = "current"
    """Points the sparse volume is voxelised from (it is sampled at the current means either way):
    "current", the anchors moved by the cached offsets (new voxels every step); "anchors", the
    node's anchors, constant per segment, so the voxel grid and spconv's index pairs are cached
    across steps (:mod:`evolsplat_ns.model.volume_cache`; docs/performance.md has the figures)."""
    volume_refresh_every: int = 4
    """With ``volume_from "current"``: voxelise the moved means (and rebuild spconv's index pairs,
    the host-heavy part of the U-Net) every this many training steps of a segment; in between the
    U-Net runs on the segment's last voxel set while the offsets move (at most ``offset_max`` per
    axis), and the volume is sampled at the current means as always. Renders in eval mode keep a
    voxel set of their own, rebuilt whenever the means moved. 1: every step (exact). 4: held-out
    PSNR within +-0.07 dB of 1 in two pairs on an H200, 124-186 launches per step fewer. The voxel
    set travels in checkpoints, so a resumed run rebuilds where the uninterrupted one does.
    docs/performance.md has the figures."""
    enable_background: bool = True
    """Predict a sky/background dome composited behind the foreground Gaussians."""
    min_views: int = 1
    """Gaussians seen by fewer selected source views are dropped for that target."""
    freeze_volume: bool = False
    """Build each segment's volume once and reuse it detached (inference)."""
    color_hidden: int = 128
    """Hidden width of the colour head (MLP over projected source-view windows)."""
    geometry_hidden: int = 64
    """Hidden width of the scale/rotation, opacity and offset heads."""
    background_hidden: int = 64
    """Hidden width of the background model."""
    background_points: int = 2048
    """Gaussians on the background dome."""
    background_sky_colors: bool = False
    """Colour the dome only from the sources' sky pixels (needs ``dataset.load_sky_masks True``);
    False: from whatever the sources show in its direction, which lets the dome stand in for
    foreground the point cloud misses (building tops above the LiDAR), see docs/fidelity.md."""
    background_source: Literal["dome", "sources"] = "sources"
    """What is composited behind the foreground (with ``enable_background``): "sources", the
    target's nearest source images warped at infinity (the sky needs no depth:
    :mod:`evolsplat_ns.model.sky_warp`; their sky pixels only when the samples carry sky masks)
    where they see the pixel's direction, the dome elsewhere (e.g. above their view); "dome", the
    dome of Gaussians alone (as before this setting existed). docs/fidelity.md has the figures."""
    occlusion_tau: float = 1.0
    """Metres of occlusion cue over which a source view's weight falls by 1/e."""
    enable_actors: bool = True
    """Render moving instances as rigid actor nodes placed by their box tracks (False: they are
    left out of the reconstruction, as before actors existed)."""
    actor_hidden: int = 64
    """Hidden width of the actor head."""


@dataclass
class SharedState:
    """Target-independent results of :meth:`GaussianPredictor.encode` for one step.

    Attributes:
        node: the node the state was built from.
        anchors: [N, 3] node means (no grad), segment frame.
        volume: the sparse feature volume.
        volume_feat: [N, C] volume features at means + cached offset (boundary leaf when split).
        offset: [N, 3] predicted offsets (boundary leaf when split).
        projected: source-view features of every node Gaussian in every source view.
        source_c2w: [V, 4, 4] OpenCV camera-to-segment of the sources (host memory: view selection
            runs on the CPU, with no kernel launch and no device sync).
        sources: the source views themselves (a reference, not a copy), for the background warped
            from them (``background_source "sources"``); None in states built without them.
        dome: sky dome (None when the background is disabled).
        actor_nodes: the segment's moving actors (None without any).
        actors: their Gaussians in object frames, predicted from the sources (boundary leaves when split).
        background: the dome's Gaussians (None without a background); view-independent, so
            predicted once per state (behind the boundary when split, like ``volume_feat``).
        view_inputs: per set of selected source views, the target-independent inputs of the
            heads (:class:`ViewInputs`); filled on first use, so targets that select the same
            sources share one visibility test and one aggregation.
        graphs: CUDA graphs of no-grad per-camera decodes from this state (renders replay them:
            ``EVolSplatModel.render(..., reuse_graphs=True)``); freed with the state.
    """

    node: GaussianNode
    anchors: torch.Tensor
    volume: SparseVolume
    volume_feat: torch.Tensor
    offset: torch.Tensor
    projected: ProjectedFeatures
    source_c2w: torch.Tensor
    dome: Optional[SkyDome] = None
    sources: Optional[Views] = field(default=None, repr=False)
    actor_nodes: Optional[ActorNodes] = None
    actors: Optional[ActorGaussians] = None
    background: Optional[GaussianParams] = None
    view_inputs: dict[tuple[int, ...], "ViewInputs"] = field(default_factory=dict, repr=False)
    graphs: GraphCache = field(default_factory=GraphCache, repr=False)
    _selected: dict[tuple[int, ...], Views] = field(default_factory=dict, repr=False)
    _stacks: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    _posed: OrderedDict[float, tuple] = field(default_factory=OrderedDict, repr=False)
    """Posed actors of no-grad renders by time: (actors, actor_nodes, GaussianParams)."""
    _boundary: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def backward_shared(self) -> None:
        """Backpropagate the gradients accumulated on the boundary through the shared graph (once).

        Call after the last per-target ``backward()`` of the step; a no-op when ``encode`` ran with
        ``split_backward=False`` or without grad, or when no target loss reached the boundary.
        """
        pairs = [(graph, leaf.grad) for graph, leaf in self._boundary if leaf.grad is not None]
        self._boundary = []
        if pairs:
            torch.autograd.backward([g for g, _ in pairs], [d for _, d in pairs])

    def selected_sources(self, views: torch.Tensor) -> Optional[Views]:
        """``sources`` at host indices ``views`` [S] (cached: selecting copies the indices to the
        device, which a captured render must not do), or None for a state without sources."""
        if self.sources is None:
            return None
        key = tuple(int(i) for i in views)
        if key == tuple(range(len(self.sources))):
            return self.sources
        if key not in self._selected:
            self._selected[key] = self.sources.select(views.to(self.sources.images.device, non_blocking=True))
        return self._selected[key]

    def sky_stack(self, views: torch.Tensor) -> torch.Tensor:
        """The sky warp's :func:`~evolsplat_ns.model.sky_warp.source_stack` [S, 4, H, W] of the
        sources at host indices ``views`` [S] (cached: every target and frame that selects them
        warps the same stack). Needs a state with sources."""
        key = tuple(int(i) for i in views)
        if key not in self._stacks:
            src = self.selected_sources(views)
            with torch.no_grad():
                self._stacks[key] = source_stack(src.images, src.sky_masks)
        return self._stacks[key]


@dataclass
class ViewInputs:
    """What the heads read for one set of selected source views, the same for every target that
    selects them (no grad: image features describe the anchors, see ``Projector.sample``).

    Attributes:
        index: [M] node indices of the Gaussians seen by at least ``min_views`` of those sources.
        image_feat: [M, A] visibility-weighted aggregate of their source windows.
        anchors: [M, 3] node means (segment frame); anchor_dc: [M, 3]; base_log_scale: [M, 3].
    """

    index: torch.Tensor
    image_feat: torch.Tensor
    anchors: torch.Tensor
    anchor_dc: torch.Tensor
    base_log_scale: torch.Tensor
    _padded: dict[int, "ViewInputs"] = field(default_factory=dict, repr=False)
    ROWS: ClassVar[tuple[str, ...]] = ("index", "image_feat", "anchors", "anchor_dc", "base_log_scale")
    """The per-row fields, in constructor order."""

    def padded(self, rows: int) -> "ViewInputs":
        """These inputs with copies of their first ``rows - M`` rows appended (cached per size; at
        most M, see ``bucket_rows``): a fixed shape for a captured graph, whose outputs for the
        copies are cut off again (no gradient reaches them). Copies of distinct rows, not of one:
        the gathers' backward serialised repeated indices (15k copies of one row cost 10 ms
        with advanced indexing)."""
        if rows not in self._padded:
            extra = rows - len(self.index)
            pad = lambda t: torch.cat([t, t[:extra]])  # noqa: E731
            self._padded[rows] = ViewInputs(*(pad(getattr(self, name)) for name in self.ROWS))
        return self._padded[rows]


POSED_TIMES = 8
"""Times whose posed actors a state keeps for no-grad renders (least recently used dropped)."""
HEAD_GRAPHS = 3
"""Head graphs kept per cache (least recently used dropped): each holds its static activations
(and gradients) at its row count; training at 100k Gaussians peaked 0.23 GB higher with them."""
MAX_GRAPH_ROWS = 1 << 18
"""Targets with more rows than this run their heads eagerly: there the GPU work is large enough to
hide the launches, and a graph's memory would not be."""


def _can_graph_heads(target_c2w: torch.Tensor, rows: int, padded: int) -> bool:
    """Whether a target's heads may replay a graph: on a GPU, not under an autocast that caches
    its weight casts (a graph cannot capture the cache; the trainer's autocast has none), with rows
    to predict and not too many."""
    cached_autocast = torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled()
    return target_c2w.is_cuda and not cached_autocast and 0 < rows and padded <= MAX_GRAPH_ROWS


def _autocast_dtype() -> Optional[torch.dtype]:
    """The CUDA autocast dtype in force (None without autocast): graphs are captured per dtype."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _gather_rows(state: SharedState, rows: "ViewInputs") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The offsets [M, 3], current means [M, 3] (segment frame) and volume features [M, C] of the
    node rows ``rows.index`` [M], differentiable into the state's boundary leaves."""
    return _gather(state.offset, state.volume_feat, rows.index, rows.anchors)


def _gather(offset: torch.Tensor, volume_feat: torch.Tensor, index: torch.Tensor,
            anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``index`` [M] of the node's ``offset`` [N, 3] and ``volume_feat`` [N, C], and the
    current means ``anchors`` [M, 3] + offset (segment frame)."""
    # index_select, not x[index]: its backward is one index_add_, where advanced indexing's
    # (index_put_ with accumulate) sorts the indices first (~0.2 ms of host time per call).
    rows_offset = offset.index_select(0, index)
    return rows_offset, anchors + rows_offset, volume_feat.index_select(0, index)


def on_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` (poses, frame ids) in host memory: a device tensor costs one device sync, so loops
    pass host copies."""
    return t if t.device.type == "cpu" else t.detach().cpu()


def _boundary_leaf(t: torch.Tensor, boundary: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A leaf copy of ``t`` that collects gradients; records (graph, leaf) in ``boundary``.

    ``t`` is returned as is when nothing upstream needs gradients (e.g. a frozen volume)."""
    if not t.requires_grad:
        return t
    leaf = t.detach().requires_grad_(True)
    boundary.append((t, leaf))
    return leaf


class GaussianPredictor(nn.Module):
    """Sparse volume + projector + MLP heads (+ background) predicting Gaussians for target views."""

    def __init__(self, config: PredictorConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PredictorConfig()
        if c.volume_refresh_every < 1:
            raise ValueError(f"volume_refresh_every must be >= 1 (training steps), got {c.volume_refresh_every} "
                             "(set pipeline.model.volume_refresh_every to 1 to rebuild the voxel set every step)")
        if c.volume_from not in VOLUME_FROM:
            raise ValueError(f"volume_from must be one of {VOLUME_FROM}, got {c.volume_from!r} "
                             "(set pipeline.model.volume_from to 'current' or 'anchors')")
        self.projector = Projector(c.local_radius, c.num_neighbour_select, c.min_views)
        self.volume_net = SparseCostRegNet(in_dim=3, out_dim=c.sparseConv_outdim)
        self.color_head = ColorHead(
            self.projector.window_size, c.sparseConv_outdim, c.sh_degree, c.color_hidden
        )
        self.scale_rotation_head = ScaleRotationHead(c.sparseConv_outdim, c.geometry_hidden)
        self.opacity_head = OpacityHead(c.sparseConv_outdim, c.geometry_hidden)
        self.offset_head = OffsetHead(c.sparseConv_outdim, c.geometry_hidden, c.offset_max)
        self.background = (
            BackgroundModel(c.background_points, hidden=c.background_hidden, sh_degree=c.sh_degree,
                            sky_colors=c.background_sky_colors)
            if c.enable_background
            else None
        )
        self.actor_head = (ActorHead(self.projector.window_size, c.sh_degree, c.actor_hidden)
                           if c.enable_actors else None)
        self._warp_graphs = GraphCache(capacity=2)
        """Captured sky warps per (sources, image) shape (:meth:`predict_sky` with ``graphed``)."""
        # A tuple: the decoder holds the heads registered above, and must not register them twice.
        self._decoder = (ViewDecoder(self.color_head, self.scale_rotation_head, self.opacity_head),)
        self._head_graphs = GraphCache(capacity=HEAD_GRAPHS, grad=True)
        """Captured heads + their backward per padded row count (:meth:`predict` with ``graphed``)."""
        self._head_render_graphs = GraphCache(capacity=HEAD_GRAPHS)
        """The same without grad (renders), per padded row count: any state and source set of that
        size replays it, so a moving viewer camera captures rarely."""

    def build_volume(self, node: GaussianNode, cache: Optional[VolumeIndexCache] = None) -> SparseVolume:
        """The node's sparse feature volume (segment frame), voxelised from the points
        ``volume_from`` names with the anchors' colours; ``cache`` (the segment's) keeps the voxel
        grid and index pairs while those points are unchanged (outputs are the same either way)."""
        anchors = self.config.volume_from == "anchors"
        points = node.means.detach() if anchors else node.current_means().detach()
        sources = (node.means, node.features_dc) if anchors else (node.means, node.offset, node.features_dc)
        with sparse_conv_precision(points.device):
            if cache is None:
                return build_volume(self.volume_net, points, node.rgb(), self.config.voxel_size)
            return cache.build(self.volume_net, points, node.rgb, self.config.voxel_size, sources,
                               moving=() if anchors else (1,), refresh_every=self.config.volume_refresh_every)

    def select_sources(self, source: Views, target_c2w: torch.Tensor) -> Views:
        """The ``num_neighbour_select`` sources nearest to ``target_c2w`` [4, 4] (OpenCV cam-to-segment)."""
        return source.select(self.projector.select_views(target_c2w, source.camtoworlds))

    def encode(
        self,
        node: GaussianNode,
        source: Views,
        volume: Optional[SparseVolume] = None,
        split_backward: bool = True,
        actors: Optional[ActorNodes] = None,
        source_poses: Optional[torch.Tensor] = None,
        volume_cache: Optional[VolumeIndexCache] = None,
    ) -> SharedState:
        """Target-independent work of one step.

        Args:
            node: anchor Gaussians (segment frame); ``node.offset`` is the cache from the last step.
            source: source views (OpenCV camera-to-segment), images [V, H, W, 3].
            volume: a prebuilt (frozen, detached) volume of this node to use instead of running
                the sparse U-Net; its owner (the segment store) keeps it across steps.
            split_backward: cut the shared outputs at a grad boundary (see module doc).
            actors: the segment's moving actors (object frames + box tracks); their Gaussians are
                predicted here from windows sampled at each source's own time.
            source_poses: ``source.camtoworlds`` in host memory if the caller has it (else it is
                copied back from the device once, a sync).
            volume_cache: the segment's voxel-grid/index-pair cache for building the volume.
        """
        if source.images.shape[0] == 0:
            raise ValueError("encode needs at least one source view")
        positions = node.current_means().detach()
        with phase("volume"):
            volume = volume if volume is not None else self.build_volume(node, volume_cache)
            volume_feat = volume.sample(positions)
        with phase("heads"):
            offset = self.offset_head(volume_feat)
        boundary: list[tuple[torch.Tensor, torch.Tensor]] = []
        split = split_backward and torch.is_grad_enabled()
        if split:
            # offset is cut as well: its graph runs through volume_feat's, which a per-target
            # backward would otherwise free.
            volume_feat, offset = _boundary_leaf(volume_feat, boundary), _boundary_leaf(offset, boundary)
        with phase("projector"):
            projected = self.projector.sample(positions, source)
            dome = self.background.build_dome(positions, source) if self.background is not None else None
        actor_gaussians = self._encode_actors(actors, source, boundary if split else None)
        background = None
        if dome is not None:
            with phase("heads"):
                background = self.background(dome)
            if split:
                background.sh = _boundary_leaf(background.sh, boundary)
                background.scales = _boundary_leaf(background.scales, boundary)
        return SharedState(
            node=node,
            anchors=node.means.detach(),
            volume=volume,
            volume_feat=volume_feat,
            offset=offset,
            projected=projected,
            source_c2w=source_poses if source_poses is not None else on_host(source.camtoworlds),
            dome=dome,
            sources=source,
            actor_nodes=actors if actor_gaussians is not None else None,
            actors=actor_gaussians,
            background=background,
            _boundary=boundary,
        )

    def _encode_actors(self, actors: Optional[ActorNodes], source: Views,
                       boundary: Optional[list]) -> Optional[ActorGaussians]:
        """Object-frame actor Gaussians from the sources (cut at the boundary when given)."""
        if actors is None or self.actor_head is None or len(actors) == 0:
            return None
        with phase("actors"):
            with full_precision(source.images.device):  # posing anchors per view: fp32 geometry
                feat = sample_actor_windows(self.projector, actors, source, self.config.occlusion_tau)
            g = self.actor_head(feat, actors)
        if boundary is None:
            return g
        return replace(g, **{f.name: _boundary_leaf(getattr(g, f.name), boundary) for f in fields(g)
                             if f.name in ("quats", "scales", "opacities", "sh")})

    def predict_actors(self, state: SharedState, time: Optional[float]) -> Optional[GaussianParams]:
        """The actors' Gaussians posed in the segment frame at ``time`` (scene frame units), or None
        without actors or time. Under grad recomputed per call (cheap) so each target's backward owns its
        graph; no-grad renders reuse the last ``POSED_TIMES`` times' placements."""
        if state.actors is None or time is None:
            return None
        if torch.is_grad_enabled():
            return self._place_actors(state, time)
        # No-grad renders (a viewer moving its camera at one time) reuse the posed actors, while
        # the state holds the same actors and tracks (stage 2 may swap in refined ones).
        made_from = (state.actors, state.actor_nodes)
        entry = state._posed.pop(float(time), None)
        if entry is None or entry[0] is not made_from[0] or entry[1] is not made_from[1]:
            entry = (*made_from, self._place_actors(state, time))
        state._posed[float(time)] = entry
        while len(state._posed) > POSED_TIMES:
            state._posed.popitem(last=False)
        return entry[2]

    @staticmethod
    def _place_actors(state: SharedState, time: float) -> GaussianParams:
        with full_precision(state.anchors.device):  # box poses applied in fp32 (see model.precision)
            return place_actors(state.actors, state.actor_nodes, time)

    def nearest_views(self, state: SharedState, target_c2w: torch.Tensor) -> torch.Tensor:
        """Indices [S] (host) of the ``num_neighbour_select`` sources of ``state`` nearest to the
        target ``target_c2w`` [4, 4] (OpenCV camera-to-segment; host memory avoids a device sync)."""
        return self.projector.select_views(on_host(target_c2w), state.source_c2w)

    def view_inputs(self, state: SharedState, views: torch.Tensor) -> ViewInputs:
        """The heads' target-independent inputs for source views ``views`` [S] (host indices),
        cached in ``state``. The aggregation over views is order-free, so the cache is keyed by
        the sorted set: targets choosing the same sources in another order share one entry."""
        key = tuple(sorted(int(i) for i in views))
        if key not in state.view_inputs:
            with torch.no_grad():
                proj = state.projected
                if key != tuple(range(proj.valid.shape[1])):
                    idx = torch.tensor(key, dtype=torch.long).to(proj.valid.device, non_blocking=True)
                    proj = proj.select_views(idx, self.config.min_views)
                index = proj.keep.nonzero()[:, 0]  # the one host sync per source set
                image_feat = aggregate_views(
                    proj.colors[index], proj.occlusion[index], proj.valid[index], self.config.occlusion_tau
                )
                node = state.node
                state.view_inputs[key] = ViewInputs(index, image_feat, state.anchors[index],
                                                    node.features_dc[index], node.scales[index])
        return state.view_inputs[key]

    def predict(self, state: SharedState, target_c2w: torch.Tensor, target_K: torch.Tensor,
                views: Optional[torch.Tensor] = None, graphed: bool = False) -> GaussianParams:
        """Gaussians for one target: ``target_c2w`` [4, 4] OpenCV camera-to-segment, ``target_K`` [3, 3]
        (host or device; moved to the state's device).

        Only node Gaussians seen by at least ``min_views`` of the ``num_neighbour_select`` sources
        nearest to the target (or of ``views`` [S], host indices, when given) are returned
        (``index`` says which). ``graphed`` (CUDA): the heads (and under grad their backward)
        replay a graph captured per padded row count (:func:`~evolsplat_ns.model.heads.bucket_rows`);
        the caller consumes (and back-propagates) the outputs before the next graphed call, which
        overwrites them.
        """
        if views is None:
            views = self.nearest_views(state, target_c2w)
        device = state.anchors.device
        target_c2w = target_c2w.to(device, non_blocking=True)
        target_K = target_K.to(device, non_blocking=True)
        inputs = self.view_inputs(state, views)
        m = len(inputs.index)
        rows = bucket_rows(m)
        graphed = graphed and _can_graph_heads(target_c2w, m, rows)
        if graphed:
            padded = self._replay_heads(state, inputs.padded(rows), target_c2w, target_K)
            return replace(padded.head(m), index=inputs.index)
        offset, means, volume_feat = _gather_rows(state, inputs)
        sh, scales, quats, opacities = self._decoder[0](inputs.image_feat, volume_feat, means.detach(), target_c2w,
                                                        target_K, inputs.anchor_dc, inputs.base_log_scale)
        return GaussianParams(means=means, quats=quats, scales=scales, opacities=opacities, sh=sh,
                              index=inputs.index, offset=offset.detach())

    def _replay_heads(self, state: SharedState, rowwise: "ViewInputs", target_c2w: torch.Tensor,
                      target_K: torch.Tensor) -> GaussianParams:
        """The heads' graph on the padded rows ``rowwise``: under grad the forward + backward graph
        (means differentiable into the state's offsets, ``offset`` detached), else the render graph."""
        if not torch.is_grad_enabled():
            return self._replay_render_heads(state, rowwise, target_c2w, target_K)
        offset, means, volume_feat = _gather_rows(state, rowwise)
        args = (rowwise.image_feat, volume_feat, means.detach(), target_c2w, target_K, rowwise.anchor_dc,
                rowwise.base_log_scale)
        key = (len(rowwise.index), volume_feat.requires_grad, _autocast_dtype())
        sh, scales, quats, opacities = self._head_graphs(key, self._decoder[0], args, state.anchors.device)
        return GaussianParams(means=means, quats=quats, scales=scales, opacities=opacities, sh=sh,
                              offset=offset.detach())

    def _replay_render_heads(self, state: SharedState, rowwise: "ViewInputs", target_c2w: torch.Tensor,
                             target_K: torch.Tensor) -> GaussianParams:
        """The render heads' graph on the padded rows ``rowwise``. The gathers replay too, from the
        state's whole tensors: a moving camera then passes the same inputs every frame, and only
        the camera is copied into the graph."""
        args = (state.offset, state.volume_feat, rowwise.index, rowwise.image_feat, rowwise.anchors,
                target_c2w, target_K, rowwise.anchor_dc, rowwise.base_log_scale)
        key = (len(rowwise.index), tuple(state.volume_feat.shape), _autocast_dtype())
        means, offset, sh, scales, quats, opacities = self._head_render_graphs(key, self._decode_rows, args,
                                                                               state.anchors.device)
        return GaussianParams(means=means, quats=quats, scales=scales, opacities=opacities, sh=sh, offset=offset)

    def _decode_rows(self, offset: torch.Tensor, volume_feat: torch.Tensor, index: torch.Tensor,
                     image_feat: torch.Tensor, anchors: torch.Tensor, target_c2w: torch.Tensor,
                     target_K: torch.Tensor, anchor_dc: torch.Tensor,
                     base_log_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """No-grad decode of rows ``index`` [M] from the state's ``offset`` [N, 3] and
        ``volume_feat`` [N, C] (the unit a render graph captures): current means [M, 3] (segment
        frame), offsets [M, 3], then the decoder's SH, scales, quats and opacities."""
        offset, means, volume_feat = _gather(offset, volume_feat, index, anchors)
        return (means, offset, *self._decoder[0](image_feat, volume_feat, means, target_c2w, target_K, anchor_dc,
                                                 base_log_scale))

    def predict_many(self, state: SharedState, target_c2ws: torch.Tensor, target_Ks: torch.Tensor,
                     views: Sequence[torch.Tensor]) -> list[GaussianParams]:
        """:meth:`predict` for C targets with one call of the heads (eager): ``target_c2ws``
        [C, 4, 4] OpenCV camera-to-segment and ``target_Ks`` [C, 3, 3] on the state's device,
        ``views`` the C targets' source indices [S] (host). Each target gets its own rows (the
        Gaussians its sources see) with its own view features; the outputs are those of C
        :meth:`predict` calls, one :class:`~evolsplat_ns.model.node.GaussianParams` per target."""
        device = state.anchors.device
        inputs = [self.view_inputs(state, v) for v in views]
        sizes = [len(i.index) for i in inputs]
        rows = ViewInputs(*(torch.cat([getattr(i, name) for i in inputs]) for name in ViewInputs.ROWS))
        target = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device, non_blocking=True)
        offset, means, volume_feat = _gather_rows(state, rows)
        out = self._decoder[0](rows.image_feat, volume_feat, means.detach(), target_c2ws[target], target_Ks[target],
                               rows.anchor_dc, rows.base_log_scale)
        parts = [t.split(sizes) for t in (means, offset.detach(), *out)]
        return [GaussianParams(means=m, quats=q, scales=s, opacities=o, sh=sh, index=i.index, offset=d)
                for i, m, d, sh, s, q, o in zip(inputs, *parts)]

    def predict_background(self, state: SharedState) -> Optional[GaussianParams]:
        """Sky-dome Gaussians to rasterise behind the foreground, or None without a background.

        Predicted once per state by :meth:`encode` (the dome does not depend on the target); with
        ``split_backward`` its differentiable outputs sit behind the boundary, so every target's
        backward accumulates into them and ``backward_shared`` runs the MLP's backward once.
        """
        return state.background

    def predict_sky(self, state: SharedState, views: torch.Tensor, target_c2w: torch.Tensor, target_K: torch.Tensor,
                    width: int, height: int, graphed: bool = False) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The sources ``views`` [S] (host indices into ``state``'s sources, those :meth:`predict`
        used) warped at infinity into the target ``target_c2w`` [4, 4] (OpenCV camera-to-segment),
        ``target_K`` [3, 3]: rgb [H, W, 3] and coverage weight [H, W] (:func:`warp_at_infinity`), or
        None unless ``background_source`` is "sources" (and a background is enabled). No gradient:
        nothing learnable is in it. ``graphed`` (CUDA): replayed from a graph captured per shape, its
        inputs copied in (the outputs are the graph's: overwritten by the next graphed warp)."""
        if self.config.background_source != "sources" or self.background is None or state.sources is None:
            return None
        src, stack = state.selected_sources(views), state.sky_stack(views)
        inputs = (stack, src.intrinsics, src.camtoworlds, target_c2w, target_K)

        def warp(stack, Ks, c2ws, c2w, K):
            return warp_stack_at_infinity(stack, Ks, c2ws, c2w, K, width, height)

        if not (graphed and target_c2w.is_cuda):
            with torch.no_grad():
                return warp(*inputs)
        return self._warp_graphs((tuple(stack.shape), width, height), warp, inputs, target_c2w.device)
