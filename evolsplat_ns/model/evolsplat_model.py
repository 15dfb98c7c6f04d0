"""EVolSplat as a nerfstudio ``Model``: per-segment Gaussian nodes, feed-forward prediction, render.

The model owns the networks (:class:`GaussianPredictor`), the per-segment nodes with their offset
caches, and a *context*: the segment currently shown (node + a pool of posed source views). With
a context set, :meth:`get_outputs_for_camera` renders any nerfstudio camera with no batch, which is
what the viewer and ns-eval need.

Frames: nerfstudio ``Cameras`` carry OpenGL camera-to-world poses; here they are in the segment
frame of the current context and are converted to OpenCV at :func:`camera_to_opencv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.utils.colormaps import apply_depth_colormap
from torch.nn import Parameter

from evolsplat_ns import registry
from evolsplat_ns.data.types import PointCloud, Views
from evolsplat_ns.engine.losses import entropy_loss
from evolsplat_ns.engine.metrics import image_metrics
from evolsplat_ns.geometry import opengl_to_opencv
from evolsplat_ns.model.node import GaussianNode, GaussianParams
from evolsplat_ns.model.predictor import GaussianPredictor, PredictorConfig
from evolsplat_ns.model.render import rasterize
from evolsplat_ns.model.splatfacto_compat import SplatfactoSurface
from evolsplat_ns.utils.timing import phase
from evolsplat_ns.viewer.state_cache import EncodedStateCache, neighbour_count


@dataclass
class EVolSplatModelConfig(ModelConfig, PredictorConfig):
    """EVolSplat hyper-parameters (defaults as the paper's design). The network's own fields
    (sparseConv_outdim, local_radius, offset_max, num_neighbour_select, sh_degree, voxel_size,
    freeze_volume, enable_background, min_views, ...) come from :class:`PredictorConfig`."""

    _target: Type = field(default_factory=lambda: EVolSplatModel)
    rgb_loss: str = "l1_ssim"
    """Photometric loss, by registered name (entry-point group evolsplat_ns.losses)."""
    ssim_lambda: float = 0.2
    entropy_loss: float = 0.1
    """Weight of the accumulation entropy loss (applied every ``entropy_loss_every`` steps)."""
    entropy_loss_every: int = 10
    scale_init: float = 0.0
    """Initial Gaussian scale in metres; 0 = mean distance to the 3 nearest neighbours."""
    renderer: Literal["auto", "gsplat", "reference"] = "auto"
    """Rasteriser: gsplat (CUDA), the PyTorch reference, or auto (gsplat when on CUDA)."""
    max_gaussians_per_segment: int = 0
    """Randomly subsample a segment's points to at most this many Gaussians (0 = all)."""


class EmptySegmentError(ValueError):
    """A segment whose point cloud has no points (the trainer skips it, counted and warned)."""


@dataclass
class SegmentContext:
    """What the model renders when asked for a camera without a batch."""

    key: str
    node: GaussianNode
    sources: Views
    """Candidate source views (OpenCV camera-to-segment poses), on the model's device."""
    snapshot: Optional[tuple[int, GaussianParams]] = field(default=None, repr=False)
    """(model step, Gaussians) of :meth:`EVolSplatModel.snapshot_gaussians`."""
    encoded: EncodedStateCache = field(default_factory=EncodedStateCache, repr=False)
    """Encoded states of this context's chosen sources, reused by :meth:`EVolSplatModel.get_outputs_for_camera`
    (a new context, made by every ``set_context``, starts empty)."""


def camera_to_opencv(camera: Cameras) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A single nerfstudio camera -> (OpenCV camera-to-world [4, 4], K [3, 3], W, H)."""
    c2w = torch.eye(4, device=camera.camera_to_worlds.device)
    c2w[:3, :4] = camera.camera_to_worlds.reshape(-1, 3, 4)[0]
    K = torch.eye(3, device=c2w.device)
    K[0, 0], K[1, 1] = camera.fx.reshape(-1)[0], camera.fy.reshape(-1)[0]
    K[0, 2], K[1, 2] = camera.cx.reshape(-1)[0], camera.cy.reshape(-1)[0]
    return opengl_to_opencv(c2w), K, int(camera.width.reshape(-1)[0]), int(camera.height.reshape(-1)[0])


class EVolSplatModel(SplatfactoSurface):
    """EVolSplat. Derives from nerfstudio's ``Model`` through :class:`SplatfactoSurface` only so
    that nerfstudio's Gaussian-splatting tools (``ns-export gaussian-splat``, viewer) accept it."""

    config: EVolSplatModelConfig
    render_num_sources: Optional[int] = None
    """Source views per bare-camera render (the viewer's slider); None = ``num_neighbour_select``."""

    def populate_modules(self) -> None:
        self.predictor = GaussianPredictor(PredictorConfig(
            **{f.name: getattr(self.config, f.name) for f in fields(PredictorConfig)}))
        self.rgb_loss = registry.get("losses", self.config.rgb_loss)
        self.nodes: dict[str, GaussianNode] = {}
        self.context: Optional[SegmentContext] = None
        self.step = 0

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        return {"networks": list(self.predictor.parameters())}

    # -- segment state ---------------------------------------------------------------------------

    def node_for(self, key: str, point_cloud: Optional[PointCloud]) -> GaussianNode:
        """The segment's node (built from ``point_cloud`` the first time)."""
        if key not in self.nodes:
            if point_cloud is None:
                raise KeyError(f"segment {key} has no node yet and no point cloud was given")
            if len(point_cloud) == 0:
                raise EmptySegmentError(f"segment {key}: its point cloud is empty (no LiDAR/depth points "
                                        "survived filtering), so there is nothing to reconstruct")
            pc = _subsample(point_cloud, self.config.max_gaussians_per_segment, _stable_seed(key))
            scale = "knn" if self.config.scale_init <= 0 else self.config.scale_init
            self.nodes[key] = GaussianNode.from_point_cloud(
                pc.to(self.device), scale_init=scale, sh_degree=self.config.sh_degree, seed=_stable_seed(key))
        return self.nodes[key]

    def set_context(self, key: str, sources: Views, point_cloud: Optional[PointCloud] = None) -> SegmentContext:
        """Make segment ``key`` (with candidate ``sources``) the one rendered for bare cameras.

        Always a fresh context, so encoded states cached for rendering never outlive a training step.
        Only the context's node lives on the model's device; the others wait in host memory, so GPU
        memory does not grow with the number of segments a long multi-scene run has visited.
        """
        previous = self.context
        node = self.node_for(key, point_cloud).to(self.device)
        if previous is not None and previous.key != key and previous.key in self.nodes:
            previous.node.to("cpu")
        self.context = SegmentContext(key, node, sources.to(self.device))
        return self.context

    # -- prediction and rendering ----------------------------------------------------------------

    def encode(self, sources: Optional[Views] = None, split_backward: bool = True):
        """Shared per-step state of the context segment (volume, window features, offsets).

        With ``split_backward`` the shared outputs sit behind a gradient boundary: per-target
        backward passes stop there and ``state.backward_shared()`` finishes the step.
        """
        ctx = self._require_context()
        sources = sources if sources is not None else ctx.sources
        return self.predictor.encode(ctx.node, sources, key=ctx.key, split_backward=split_backward)

    def render(self, state, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor]:
        """Predict Gaussians for an OpenCV camera-to-segment pose and render them.

        Returns rgb [H, W, 3], depth [H, W, 1] (OpenCV z, metres), accumulation [H, W, 1] and the
        predicted params under ``gaussians`` (for the offset cache and export).
        """
        with phase("heads"):
            params = self.predictor.predict(state, c2w, K)
            background = self.predictor.predict_background(state) if self.config.enable_background else None
        out = self.rasterize_gaussians(params, background, c2w, K, width, height)
        out["gaussians"] = params
        return out

    def rasterize_gaussians(self, params: GaussianParams, background: Optional[GaussianParams], c2w: torch.Tensor,
                            K: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor]:
        """Rasterise existing Gaussians (segment frame) for an OpenCV camera-to-segment pose,
        with ``background`` composited behind. Returns rgb, depth, accumulation as :meth:`render`."""
        viewmat = torch.linalg.inv(c2w)[None].float()

        def draw(g: GaussianParams):
            return rasterize(g.means.float(), g.quats.float(), g.scales.float(), g.opacities.float(),
                             g.sh.float(), viewmat, K[None].float(), width, height,
                             sh_degree=self.config.sh_degree, backend=self.config.renderer)

        # Rasterisation is numerically delicate (covariance inversion, compositing): always fp32.
        with torch.autocast(device_type=c2w.device.type, enabled=False), phase("render"):
            fg = draw(params)
            rgb, alpha = fg.rgb[0], fg.alpha[0]
            if background is not None:
                rgb = rgb + (1.0 - alpha) * draw(background).rgb[0]
        return {"rgb": rgb, "depth": fg.depth[0], "accumulation": alpha}

    def commit_offsets(self, state, index: torch.Tensor) -> None:
        """Write this step's predicted offsets of node Gaussians ``index`` [M] into the segment's
        cache, so the next step on this segment starts from means + offset (recursive refinement)."""
        state.node.update_offset(index, state.offset.detach()[index])

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> dict[str, torch.Tensor]:
        """Render a nerfstudio camera (OpenGL camera-to-segment of the current context); no batch.

        Uses the ``render_num_sources`` context sources nearest to the camera. Their encoded state
        is cached on the context, so while those sources stay the nearest (a viewer moving the
        camera) a frame only re-runs ``predict`` and rasterisation.
        Returns rgb [H, W, 3], depth [H, W, 1] (OpenCV z, metres), accumulation [H, W, 1].
        """
        c2w, K, W, H = camera_to_opencv(camera.to(self.device))
        ctx = self._require_context()
        with neighbour_count(self.predictor.projector, self.render_num_sources):
            out = self.render(self._encode_nearest(ctx, c2w), c2w, K, W, H)
        return {k: v for k, v in out.items() if k != "gaussians"}

    def _encode_nearest(self, ctx: SegmentContext, c2w: torch.Tensor):
        """Encoded state of ``ctx``'s sources nearest to ``c2w`` [4, 4] (OpenCV camera-to-segment),
        from the context's cache when the same sources were encoded at this step before."""
        chosen = self.predictor.projector.select_views(c2w, ctx.sources.camtoworlds).sort().values
        key = (self.step, tuple(chosen.tolist()))
        return ctx.encoded.get_or_build(key, lambda: self.encode(ctx.sources.select(chosen)))

    def get_outputs(self, ray_bundle) -> dict[str, torch.Tensor]:
        if isinstance(ray_bundle, Cameras):
            return self.get_outputs_for_camera(ray_bundle)
        raise TypeError("EVolSplatModel renders whole cameras; ray bundles are not supported")

    # -- losses and metrics ----------------------------------------------------------------------

    def view_loss(self, outputs: dict[str, torch.Tensor], gt: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Loss of one target view: photometric (+ entropy on accumulation every N steps)."""
        losses = {"rgb_loss": self.rgb_loss(outputs["rgb"], gt, self.config.ssim_lambda)}
        if self.config.entropy_loss > 0 and step % self.config.entropy_loss_every == 0:
            losses["entropy_loss"] = self.config.entropy_loss * entropy_loss(outputs["accumulation"])
        return losses

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
        """Nodes (anchors + offset caches) and frozen volumes travel in nerfstudio checkpoints."""
        return {"nodes": {k: n.state_dict() for k, n in self.nodes.items()},
                "frozen_volumes": self.predictor.frozen_state_dict(), "step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.nodes = {k: GaussianNode.from_state_dict(v).to("cpu") for k, v in state["nodes"].items()}
        if self.context is not None and self.context.key in self.nodes:  # keep the shown segment renderable
            self.context.node = self.nodes[self.context.key].to(self.device)
        self.predictor.load_frozen_state_dict(state.get("frozen_volumes", {}))
        self.step = state.get("step", 0)

    def _require_context(self) -> SegmentContext:
        if self.context is None:
            raise RuntimeError("no segment selected: call set_context(...) (the pipeline does this "
                               "when training, evaluating or when the viewer picks a segment)")
        return self.context

    @torch.no_grad()
    def snapshot_gaussians(self) -> GaussianParams:
        """Foreground Gaussians of the shown segment, predicted for its reference view (first FRONT
        source view); cached until the context or the training step changes."""
        from evolsplat_ns.export.segment import reference_view

        ctx = self._require_context()
        if ctx.snapshot is None or ctx.snapshot[0] != self.step:
            v = reference_view(ctx.sources)
            c2w, K = ctx.sources.camtoworlds[v], ctx.sources.intrinsics[v]
            state = self.encode(self.predictor.select_sources(ctx.sources, c2w), split_backward=False)
            ctx.snapshot = (self.step, self.predictor.predict(state, c2w, K))
        return ctx.snapshot[1]

    def forget_segments(self) -> None:
        """Drop every segment's node, frozen volume and the context, so scenes loaded afterwards
        start from their own point clouds even if their keys repeat a training scene's (zero-shot)."""
        self.nodes.clear()
        self.predictor.frozen_volumes.clear()
        self.context = None


def _stable_seed(key: str) -> int:
    """Process-independent seed from a segment key (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _subsample(pc: PointCloud, max_points: int, seed: int) -> PointCloud:
    if max_points <= 0 or len(pc) <= max_points:
        return pc
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pc), generator=g)[:max_points].to(pc.points.device)
    return PointCloud(pc.points[idx], pc.colors[idx], pc.dynamic, {**pc.metadata, "subsampled_to": max_points})
