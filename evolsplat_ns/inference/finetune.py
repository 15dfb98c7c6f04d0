"""Per-scene fine-tuning (``evolsplat-finetune``): the Gaussians the trained feed-forward model
predicts for a segment become plain parameters, optimised on that segment's training views.

1. **Initialisation** (:func:`predict_initial_gaussians`): for reference keyframes spread over the
   segment (every ``ref_stride``-th), the model encodes the reference's nearest source keyframes
   (the rule evaluation uses) and predicts the Gaussians for each of its cameras; each node
   Gaussian keeps the prediction made for the camera nearest to it, so points seen only late in
   the segment are covered too, each from where the model saw it best.
   The sky dome keeps the first colour of each dome point that some source saw;
   the moving actors (object frames) come from the reference nearest the segment's middle.
2. **Optimisation** (:func:`finetune_segment`): means, log scales, quaternions, opacity logits and
   SH colours (DC and higher bands) of the static and actor Gaussians, and the dome's colours and
   log scales, as ``nn.Parameter`` with Adam at splatfacto's per-parameter learning rates (means
   scaled by the extent of the training cameras, since splatfacto works in a scene normalised to
   about +-1, and decayed to 1% over the run). One random training view per step, the model's
   training loss (``EVolSplatModel.image_losses``: photometric, entropy, and the sky terms when the
   run trained with sky supervision and its views carry sky masks), the model's rasteriser.
   Optional densification and pruning of the static Gaussians (``densify``) by gsplat's own
   ``DefaultStrategy`` with splatfacto's settings, fed by the rasteriser's ``means2d`` gradient
   (gsplat's CUDA kernels and the PyTorch reference both give it); actors and the dome keep
   their count. On by default with the gsplat backend, off with the reference (cost, not ability).
   With the model's ``background_source "sources"`` every render composites the segment's
   training views warped at infinity behind (the rendered view's own image left out), the dome
   where none of them sees (:mod:`evolsplat_ns.model.sky_warp`).
   **Resumable**: with a checkpoint path the whole optimisation state (parameters of any count,
   Adam moments, step, the strategy's running statistics, the view order and the strategy's own
   stream of torch's RNG, which gsplat's split draws from) is saved every ``checkpoint_every`` steps and at the end; a run
   resumed from it gives the parameters of an uninterrupted run.
3. **Evaluation**: the segment's held-out views, scored by :func:`engine.evaluation.view_metrics`
   (the metrics of ``ns-eval`` / ``evolsplat-infer``), at the start and every ``eval_every`` steps;
   the clock (``seconds``) excludes these evaluations.

Frames: everything in the **segment frame**; cameras OpenCV camera-to-segment.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.data.segments import nearest_sources
from evolsplat_ns.data.types import SegmentKey, Views
from evolsplat_ns.engine.evaluation import next_frame, summarise, view_metrics
from evolsplat_ns.model.actors import ActorGaussians, ActorNodes, place_actors
from evolsplat_ns.model.metrics import psnr
from evolsplat_ns.model.node import GaussianParams, concat_gaussians
from evolsplat_ns.model.predictor import on_host
from evolsplat_ns.model.render import resolve_backend
from evolsplat_ns.model.sky_warp import warp_views
from evolsplat_ns.utils.errors import ConfigError

if TYPE_CHECKING:
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (learning rates as splatfacto's defaults)."""

    steps: int = 500
    """Optimisation steps per segment."""
    eval_every: int = 100
    """Held-out (and training-view) PSNR every this many steps (0 = only at the start and end)."""
    ref_stride: int = 0
    """Every k-th keyframe is an initialisation reference (0 = ``num_source_keyframes``)."""
    lr_means: float = 1.6e-4
    """Means, times the training cameras' extent in metres; decays to 1% over ``steps``."""
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh_dc: float = 2.5e-3
    lr_sh_rest: float = 2.5e-3 / 20
    lr_background: float = 2.5e-3
    """Colour (SH) and log scale of the sky-dome Gaussians."""
    max_train_eval_views: int = 8
    """Training views (evenly spread) on which ``train_psnr`` is measured at each log point."""
    seed: int = 0
    """Seed of the training-view order and of the densification's RNG stream (gsplat's split)."""
    densify: Optional[bool] = None
    """Densify and prune the static Gaussians (gsplat ``DefaultStrategy``); None = on with the gsplat
    rasteriser, off with the PyTorch reference (it works there too, but every new Gaussian costs more)."""
    densify_start: int = 500
    """First refinement step (splatfacto's ``warmup_length``)."""
    densify_every: int = 100
    """Refinement interval (splatfacto's ``refine_every``)."""
    densify_stop: int = 15_000
    """No growing or pruning from this step on (splatfacto's ``stop_split_at``)."""
    reset_opacity_every: int = 3000
    """Opacities reset to twice ``prune_opacity`` every this many steps (splatfacto: 30 x refine_every)."""
    grow_grad2d: float = 0.0002
    """Mean screen-space gradient above which a Gaussian is duplicated or split. splatfacto's 0.0008 is
    for absolute gradients, which our rasteriser does not compute; 0.0002 is 3DGS's value for plain ones."""
    prune_opacity: float = 0.1
    """Gaussians less opaque than this are pruned (splatfacto's ``cull_alpha_thresh``)."""
    checkpoint_every: int = 500
    """With a checkpoint path: save the resumable state every this many steps (0 = only at the end)."""


RESUME_FREE_SETTINGS = ("steps", "eval_every", "checkpoint_every")
"""Settings a resumed run may change: ``steps`` (the means' learning-rate decay then spans the new
total), and when to log or save. All others must match the checkpoint's."""


def make_strategy(cfg: FinetuneConfig, num_views: int):
    """gsplat's ``DefaultStrategy`` configured as splatfacto configures it (splatfacto.py, nerfstudio
    1.1.5), except for the plain-gradient threshold (``FinetuneConfig.grow_grad2d``). Scale
    thresholds are relative to the ``scene_scale`` given to ``initialize_state`` (the camera extent)."""
    from gsplat.strategy import DefaultStrategy

    return DefaultStrategy(prune_opa=cfg.prune_opacity, grow_grad2d=cfg.grow_grad2d, grow_scale3d=0.01,
                           grow_scale2d=0.05, prune_scale3d=0.5, prune_scale2d=0.15, refine_scale2d_stop_iter=4000,
                           refine_start_iter=cfg.densify_start, refine_stop_iter=cfg.densify_stop,
                           reset_every=cfg.reset_opacity_every, refine_every=cfg.densify_every,
                           pause_refine_after_reset=num_views + cfg.densify_every, absgrad=False,
                           revised_opacity=False, verbose=False)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


GAUSSIAN_KEYS = ("means", "scales", "quats", "opacities", "sh_dc", "sh_rest")
"""Raw parameters of a :class:`GaussianSet`, named as gsplat's strategies expect them."""


class GaussianSet(nn.Module):
    """One set of Gaussians as raw parameters in ``raw`` (an ``nn.ParameterDict``, the layout gsplat's
    strategies edit in place): means [N, 3], scales (log) [N, 3], quats [N, 4] (wxyz, normalised when
    read), opacities (logits) [N], sh_dc [N, 1, 3] and sh_rest [N, bases - 1, 3]."""

    def __init__(self, g: GaussianParams | ActorGaussians) -> None:
        super().__init__()
        sh = g.sh.detach().float()
        self.raw = nn.ParameterDict({
            "means": nn.Parameter(g.means.detach().float().clone()),
            "scales": nn.Parameter(g.scales.detach().float().clamp(min=1e-6).log()),
            "quats": nn.Parameter(g.quats.detach().float().clone()),
            "opacities": nn.Parameter(_logit(g.opacities.detach().float())),
            "sh_dc": nn.Parameter(sh[:, :1].clone()),
            "sh_rest": nn.Parameter(sh[:, 1:].clone())})

    def __len__(self) -> int:
        return self.raw["means"].shape[0]

    def params(self) -> GaussianParams:
        return raw_to_params(dict(self.raw))

    def load_raw(self, raw: dict[str, torch.Tensor]) -> None:
        """Take ``raw`` (same keys, any count N, e.g. a densified checkpoint) as the parameters."""
        for k in GAUSSIAN_KEYS:
            self.raw[k] = nn.Parameter(raw[k].detach().to(self.raw[k].device, torch.float32).clone())

    def param_groups(self, cfg: FinetuneConfig, extent: float, prefix: str) -> list[dict]:
        lrs = {"means": cfg.lr_means * extent, "scales": cfg.lr_scales, "quats": cfg.lr_quats,
               "opacities": cfg.lr_opacities, "sh_dc": cfg.lr_sh_dc, "sh_rest": cfg.lr_sh_rest}
        return [{"params": [self.raw[k]], "lr": lrs[k], "name": f"{prefix}{k}"} for k in GAUSSIAN_KEYS]


def raw_to_params(raw: dict[str, torch.Tensor]) -> GaussianParams:
    """Rendered Gaussians of raw parameters (:class:`GaussianSet` layout)."""
    quats = raw["quats"]
    return GaussianParams(means=raw["means"], quats=quats / quats.norm(dim=-1, keepdim=True).clamp(min=1e-8),
                          scales=raw["scales"].exp(), opacities=torch.sigmoid(raw["opacities"]),
                          sh=torch.cat([raw["sh_dc"], raw["sh_rest"]], dim=1))


class SkyDomeParams(nn.Module):
    """The sky dome as parameters: fixed means [B, 3] and opacity 1 (as the model renders it),
    trainable SH [B, bases, 3] and log scales [B, 3]."""

    def __init__(self, g: GaussianParams) -> None:
        super().__init__()
        self.register_buffer("means", g.means.detach().float().clone())
        self.register_buffer("quats", g.quats.detach().float().clone())
        self.sh = nn.Parameter(g.sh.detach().float().clone())
        self.log_scales = nn.Parameter(g.scales.detach().float().clamp(min=1e-6).log())

    def params(self) -> GaussianParams:
        return GaussianParams(means=self.means, quats=self.quats, scales=self.log_scales.exp(),
                              opacities=torch.ones_like(self.means[:, 0]), sh=self.sh)


class FinetuneGaussians(nn.Module):
    """A segment's fine-tunable Gaussians: static ones, optional actors (object frames, posed by
    their box tracks at render time) and the optional sky dome (segment frame)."""

    def __init__(self, key: SegmentKey, static: GaussianParams, background: Optional[GaussianParams],
                 actors: Optional[ActorGaussians], actor_nodes: Optional[ActorNodes]) -> None:
        super().__init__()
        self.key = key
        self.static = GaussianSet(static)
        self.background = SkyDomeParams(background) if background is not None else None
        self.actors = GaussianSet(actors) if actors is not None and len(actors.means) else None
        self.actor_nodes = actor_nodes
        if self.actors is not None:
            self.register_buffer("actor_index", actors.actor.clone())
        self.sky_sources: Optional[Views] = None
        self.sky_poses: Optional[torch.Tensor] = None

    def use_source_sky(self, views: Views) -> None:
        """Composite ``views`` (the segment's training views, on the model's device) warped at
        infinity behind the foreground, the dome where they do not see, as the model does with
        ``background_source "sources"``."""
        self.sky_sources, self.sky_poses = views, on_host(views.camtoworlds)

    def source_sky(self, model: EVolSplatModel, c2w: torch.Tensor, K: torch.Tensor, width: int,
                   height: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The nearest ``num_neighbour_select`` sky sources to ``c2w`` [4, 4] (OpenCV
        camera-to-segment) warped into it (rgb [H, W, 3], weight [H, W]), leaving out a source
        with the camera's own pose: a training view that saw its own image as the background would
        learn to leave it uncovered. None without sky sources or a dome."""
        if self.sky_sources is None or self.background is None:
            return None
        pose = on_host(c2w)
        others = ((self.sky_poses - pose).abs().amax(dim=(1, 2)) > 1e-4).nonzero()[:, 0]  # host: no sync
        if len(others) == 0:
            return None
        pick = others[model.predictor.projector.select_views(pose, self.sky_poses[others])]
        src = self.sky_sources.select(pick.to(self.sky_sources.images.device, non_blocking=True))
        return warp_views(src, c2w, K, width, height)

    def param_groups(self, cfg: FinetuneConfig, extent: float) -> list[dict]:
        groups = self.static.param_groups(cfg, extent, "")
        if self.actors is not None:
            groups += self.actors.param_groups(cfg, extent, "actor_")
        if self.background is not None:
            groups.append({"params": [self.background.sh, self.background.log_scales], "lr": cfg.lr_background,
                           "name": "background"})
        return groups

    def foreground(self, time: Optional[float]) -> GaussianParams:
        """Static Gaussians plus, at ``time`` (frame units), the actors posed by their boxes."""
        static = self.static.params()
        if self.actors is None or time is None:
            return static
        a = self.actors.params()
        posed = place_actors(ActorGaussians(a.means, a.quats, a.scales, a.opacities, a.sh, self.actor_index),
                             self.actor_nodes, time)
        return concat_gaussians([static, posed]) if len(posed) else static

    def render(self, model: EVolSplatModel, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
               time: Optional[float], with_meta: bool = False) -> dict[str, torch.Tensor]:
        """rgb [H, W, 3], depth [H, W, 1], accumulation [H, W, 1] for an OpenCV camera-to-segment pose,
        through the model's rasteriser (same backend, same compositing); ``with_meta``: also the
        rasteriser's ``meta``, whose first ``len(self.static)`` Gaussians are the static ones."""
        bg = self.background.params() if self.background is not None else None
        return model.rasterize_gaussians(self.foreground(time), bg, c2w, K, width, height, with_meta=with_meta,
                                         sky=self.source_sky(model, c2w, K, width, height))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict_initial_gaussians(model: EVolSplatModel, dataset: MultiSceneDataset, segment_index: int,
                              ref_stride: int = 0) -> FinetuneGaussians:
    """The feed-forward prediction of segment ``segment_index`` merged over reference keyframes
    (module doc, step 1); sets the model's context to the segment."""
    keyframes = dataset.keyframes(segment_index)
    seg = dataset.segments[segment_index]
    scene = dataset.scenes[seg.scene_index]
    nsk = dataset.config.num_source_keyframes
    refs = keyframes[:: max(1, ref_stride or nsk)]
    if refs[-1] != keyframes[-1]:
        refs.append(keyframes[-1])
    middle = refs[int(np.argmin([abs(f - np.mean(seg.frames)) for f in refs]))]
    cams = [c for c in scene.cameras if c != seg.held_out_camera]
    pc = dataset.point_cloud(segment_index)
    static: dict[str, torch.Tensor] = {}
    best = bg = bg_assigned = actors = actor_nodes = None
    for f in refs:
        sources = [(s, c) for s in nearest_sources(keyframes, [f], nsk, scene.ego_to_world) for c in cams]
        sample = dataset.load_sample(segment_index, sources, [(f, c) for c in cams])
        model.set_context(sample.key, sample.source, pc)
        state = model.encode(split_backward=False)
        for v in range(len(sample.target)):
            g = model.predictor.predict(state, sample.target.camtoworlds[v], sample.target.intrinsics[v])
            if best is None:
                n = len(state.anchors)
                best = torch.full((n,), float("inf"), device=g.means.device)
                static = {k: torch.zeros(n, *getattr(g, k).shape[1:], device=g.means.device, dtype=getattr(g, k).dtype)
                          for k in ("means", "quats", "scales", "opacities", "sh")}
            # Each Gaussian keeps the prediction of the reference camera nearest to it (where the
            # feed-forward model saw it best), over every camera of every reference.
            dist = (g.means - sample.target.camtoworlds[v, :3, 3].to(g.means.device)).norm(dim=-1)
            better = dist < best[g.index]
            rows = g.index[better]
            for k, val in static.items():
                val[rows] = getattr(g, k)[better].to(val.dtype)
            best[rows] = dist[better]
        b = model.predictor.predict_background(state)
        if b is not None:
            if bg is None:
                bg, bg_assigned = GaussianParams(**{k: getattr(b, k).clone() for k in
                                                    ("means", "quats", "scales", "opacities", "sh")}), state.dome.seen.clone()
            else:
                take = state.dome.seen & ~bg_assigned
                bg.sh[take], bg.scales[take] = b.sh[take], b.scales[take]
                bg_assigned |= take
        if f == middle and state.actors is not None:
            actors, actor_nodes = state.actors, state.actor_nodes
    assigned = torch.isfinite(best) if best is not None else None
    if assigned is None or not assigned.any():
        raise ValueError(f"segment {dataset.key(segment_index)}: the model predicted no Gaussian for any training view")
    keep = assigned.nonzero()[:, 0]
    init = GaussianParams(**{k: v[keep] for k, v in static.items()})
    return FinetuneGaussians(dataset.key(segment_index), init, bg, actors, actor_nodes).to(model.device)


def training_views(dataset: MultiSceneDataset, segment_index: int) -> Views:
    """Every context frame of the segment x every camera (but a held-out one), segment frame."""
    seg = dataset.segments[segment_index]
    scene = dataset.scenes[seg.scene_index]
    pairs = [(t, c) for t in seg.frames for c in scene.cameras if c != seg.held_out_camera]
    return dataset.load_sample(segment_index, pairs, pairs[:1]).source


def camera_extent(views: Views) -> float:
    """1.1 x the largest distance of a camera centre from their mean (metres, at least 1): the
    scale 3DGS/splatfacto learning rates for positions are relative to."""
    centres = views.camtoworlds[:, :3, 3]
    return max(1.0, 1.1 * float((centres - centres.mean(0)).norm(dim=-1).max()))


@torch.no_grad()
def evaluate_segment(model: EVolSplatModel, dataset: MultiSceneDataset, gaussians: FinetuneGaussians,
                     segment_index: int) -> list[tuple[str, dict]]:
    """(view name, metrics) of every held-out view attached to the segment, rendered from ``gaussians``."""
    out = []
    for i, (s, _) in enumerate(dataset.eval_items):
        if s != segment_index:
            continue
        sample = dataset.eval_sample(i)

        def render(c2w, K, width, height, time):
            return gaussians.render(model, c2w.to(model.device), K.to(model.device), width, height, time)

        for v in range(len(sample.target)):
            t = sample.target
            rendered = render(t.camtoworlds[v], t.intrinsics[v], t.width, t.height, float(t.frame_ids[v]))
            metrics = view_metrics(sample, v, rendered, render, next_frame(dataset, sample, v))
            out.append((f"{sample.key.scene}_{int(t.frame_ids[v]):03d}_{int(t.cam_ids[v])}", metrics))
    return out


@torch.no_grad()
def _train_psnr(model: EVolSplatModel, gaussians: FinetuneGaussians, views: Views, picks: list[int]) -> float:
    values = []
    for v in picks:
        out = gaussians.render(model, views.camtoworlds[v], views.intrinsics[v], views.width, views.height,
                               float(views.frame_ids[v]))
        values.append(float(psnr(out["rgb"].clamp(0, 1), views.images[v])))
    return float(np.mean(values))


@dataclass
class SegmentRun:
    """Outcome of :func:`finetune_segment`.

    Attributes:
        key: the segment. static: the optimised static Gaussians (detached; segment frame).
        num_actor_gaussians: how many actor Gaussians (object frames) were optimised.
        init_seconds: the feed-forward initialisation (encodes and predictions).
        log: per log point ``step``, ``seconds`` (optimisation time so far, evaluations excluded),
            ``loss`` (mean since the last point), ``train_psnr``, ``held_out_psnr`` (None without
            held-out views), ``gaussians`` (static count).
        views: (name, metrics) of the held-out views at the end.
        initial_views: the same at step 0 (the merged feed-forward prediction).
        gaussians: the optimised Gaussians; None when the run was restored from a finished checkpoint.
    """

    key: SegmentKey
    static: GaussianParams
    num_actor_gaussians: int
    init_seconds: float
    log: list[dict] = field(default_factory=list)
    views: list[tuple[str, dict]] = field(default_factory=list)
    initial_views: list[tuple[str, dict]] = field(default_factory=list)
    gaussians: Optional[FinetuneGaussians] = None


class _Optimisation:
    """Adam per parameter (the layout gsplat's strategies need: one optimizer, one group each) over a
    segment's :class:`FinetuneGaussians`, plus the optional densification strategy and its state."""

    def __init__(self, gaussians: FinetuneGaussians, cfg: FinetuneConfig, extent: float, num_views: int,
                 densify: bool) -> None:
        self.gaussians, self.cfg, self.extent = gaussians, cfg, extent
        self.strategy = make_strategy(cfg, num_views) if densify else None
        self.strategy_state = self.strategy.initialize_state(scene_scale=extent) if densify else None
        device = gaussians.static.raw["means"].device
        self.cuda_device = device if device.type == "cuda" else None
        # gsplat's split draws from torch's global RNG; the strategy gets a private stream of it
        # (swapped in around each call), so evaluations or lazily built modules drawing from the
        # global RNG cannot change the run, and a resumed run continues the same stream.
        with self._own_rng(None):
            torch.manual_seed(cfg.seed)
        self.build_optimizers()

    def _rng_state(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda_device) if self.cuda_device else None

    @contextmanager
    def _own_rng(self, state: Optional[tuple]) -> Iterator[None]:
        """Torch's global RNG is ``state`` (None: left as is) inside, saved to ``self.rng`` at the end,
        and the caller's RNG restored afterwards."""
        with torch.random.fork_rng(devices=[self.cuda_device] if self.cuda_device else []):
            if state is not None:
                torch.set_rng_state(state[0])
                if self.cuda_device is not None and state[1] is not None:
                    torch.cuda.set_rng_state(state[1], self.cuda_device)
            yield
            self.rng = self._rng_state()

    def build_optimizers(self) -> None:
        self.optimizers = {g["name"]: torch.optim.Adam([g], eps=1e-15)
                           for g in self.gaussians.param_groups(self.cfg, self.extent)}
        if self.strategy is not None:
            self.strategy.check_sanity(self.gaussians.static.raw, self.static_optimizers())

    def static_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: self.optimizers[k] for k in GAUSSIAN_KEYS}

    def set_means_lr(self, step: int) -> None:
        """Means' learning rate decayed to 1% over ``cfg.steps`` (static and actors)."""
        lr = self.cfg.lr_means * self.extent * 0.01 ** ((step - 1) / max(1, self.cfg.steps))
        for name in ("means", "actor_means"):
            if name in self.optimizers:
                self.optimizers[name].param_groups[0]["lr"] = lr

    def step(self, step: int, loss_fn: Callable[[bool], tuple[torch.Tensor, Optional[dict]]]) -> torch.Tensor:
        """One optimisation step; ``loss_fn(with_meta)`` renders and returns (loss, rasteriser meta)."""
        self.set_means_lr(step)
        loss, meta = loss_fn(self.strategy is not None)
        params, optimizers = self.gaussians.static.raw, self.static_optimizers()
        if self.strategy is not None:
            self.strategy.step_pre_backward(params, optimizers, self.strategy_state, step, meta)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        if self.strategy is not None:
            info = _static_info(meta, len(self.gaussians.static))
            with self._own_rng(self.rng):
                self.strategy.step_post_backward(params, optimizers, self.strategy_state, step, info, packed=False)
        return loss

    def state(self) -> dict:
        return {"gaussians": {k: v.detach().cpu() for k, v in self.gaussians.state_dict().items()},  # saved at once
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "strategy_state": self.strategy_state, "strategy_rng": self.rng}

    def load(self, state: dict) -> None:
        """Restore :meth:`state` (any static count: the parameters are re-created, then the optimizers)."""
        prefix = "static.raw."
        self.gaussians.static.load_raw({k[len(prefix):]: v for k, v in state["gaussians"].items() if k.startswith(prefix)})
        self.gaussians.load_state_dict(state["gaussians"])
        self.build_optimizers()
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        device = self.gaussians.static.raw["means"].device
        self.rng = state["strategy_rng"]
        self.strategy_state = None if state["strategy_state"] is None else {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state["strategy_state"].items()}


def _static_info(meta: dict, n: int) -> dict:
    """gsplat strategy ``info`` of the first ``n`` rendered Gaussians (the static set; posed actors
    follow in the same rasterisation). The strategy reads ``means2d.grad``: the gradient is retained
    on the full [1, N, 2] tensor the rasteriser used and its static rows handed over."""
    means2d = meta["means2d"]
    static2d = means2d.detach()[:, :n]
    static2d.grad = means2d.grad[:, :n] if means2d.grad is not None else torch.zeros_like(static2d)
    height, width = meta.get("height"), meta.get("width")
    return {"means2d": static2d, "radii": meta["radii"][:, :n], "width": width, "height": height,
            "n_cameras": 1, "gaussian_ids": None}


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file, so an interruption never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`finetune_segment` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _check_resumable(ckpt: dict, cfg: FinetuneConfig, key: SegmentKey, path: Path) -> None:
    if ckpt.get("key") != str(key):
        raise ConfigError(f"{path} is the checkpoint of segment {ckpt.get('key')}, not of {key}")
    changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["settings"].items()
               if k not in RESUME_FREE_SETTINGS and getattr(cfg, k, v) != v}
    if changed:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"cannot resume from {path}: settings differ from the checkpoint's ({what}); "
                          "resume with the same settings (only --steps may grow), or start a new output folder")
    if ckpt["step"] > cfg.steps:
        raise ConfigError(f"cannot resume from {path}: it is at step {ckpt['step']}, past --steps {cfg.steps}")


def _restored_run(ckpt: dict) -> SegmentRun:
    """The :class:`SegmentRun` of a finished checkpoint, without the model."""
    raw = {k[len("static.raw."):]: v for k, v in ckpt["gaussians"].items() if k.startswith("static.raw.")}
    actors = ckpt["gaussians"].get("actors.raw.means")
    return SegmentRun(SegmentKey.parse(ckpt["key"]),
                      raw_to_params(raw), 0 if actors is None else len(actors), ckpt["init_seconds"],
                      ckpt["log"], ckpt["views"], ckpt["initial_views"])


def finetune_segment(model: EVolSplatModel, dataset: MultiSceneDataset, segment_index: int,
                     cfg: FinetuneConfig, progress: Optional[Callable[[int, dict], None]] = None,
                     checkpoint: Optional[Path] = None) -> SegmentRun:
    """Initialise segment ``segment_index`` from the model's prediction and optimise it ``cfg.steps``
    steps on its training views (module doc); ``progress(step, entry)`` sees every log entry.

    With ``checkpoint`` (a file path) the run's state is saved there every ``cfg.checkpoint_every``
    steps and at the end, and an existing checkpoint is resumed (same settings; ``steps`` may grow).
    A finished checkpoint at ``cfg.steps`` is returned as it is (``gaussians`` None) without the model.
    """
    key = dataset.key(segment_index)
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None and checkpoint.is_file() else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg, key, checkpoint)
        if ckpt["step"] == cfg.steps:
            return _restored_run(ckpt)
    device = model.device
    model.eval()  # the networks only initialise; BatchNorm statistics stay as trained
    dataset.point_cloud(segment_index)  # data preparation (cached), not part of the timed prediction
    _sync(device)
    start = time.perf_counter()
    gaussians = predict_initial_gaussians(model, dataset, segment_index, cfg.ref_stride)
    _sync(device)
    init_seconds = time.perf_counter() - start
    views = training_views(dataset, segment_index).to(device)
    if model.config.background_source == "sources":
        gaussians.use_source_sky(views)
    picks = sorted(set(np.linspace(0, len(views) - 1, min(cfg.max_train_eval_views, len(views))).round().astype(int)))
    densify = cfg.densify if cfg.densify is not None else resolve_backend(model.config.renderer, device.type == "cuda") == "gsplat"
    opt = _Optimisation(gaussians, cfg, camera_extent(views), len(views), densify)
    gen = torch.Generator().manual_seed(cfg.seed)
    run = SegmentRun(key, gaussians.static.params(), 0, init_seconds, gaussians=gaussians)
    elapsed, losses, first = 0.0, [], 1

    def log(step: int) -> dict:
        views_now = evaluate_segment(model, dataset, gaussians, segment_index)
        held = [m["psnr"] for _, m in views_now]
        entry = {"step": step, "seconds": elapsed, "loss": float(np.mean(losses)) if losses else None,
                 "train_psnr": _train_psnr(model, gaussians, views, picks),
                 "held_out_psnr": float(np.mean(held)) if held else None, "gaussians": len(gaussians.static)}
        run.log.append(entry)
        run.views = views_now
        if step == 0:
            run.initial_views = views_now
        losses.clear()
        return entry

    def save(step: int) -> None:
        _atomic_save({"key": str(key), "step": step, "settings": dict(vars(cfg)), "init_seconds": run.init_seconds,
                      "elapsed": elapsed, "losses": list(losses), "log": run.log, "views": run.views,
                      "initial_views": run.initial_views, "densify": densify, "view_rng": gen.get_state(),
                      **opt.state()}, checkpoint)

    if ckpt is None:
        entry = log(0)
        if progress is not None:
            progress(0, entry)
    else:
        if ckpt["densify"] != densify:
            raise ConfigError(f"cannot resume from {checkpoint}: it was run with densify {ckpt['densify']}, "
                              f"now {densify}; pass --densify/--no-densify as before")
        opt.load(ckpt)
        gaussians = opt.gaussians
        first, elapsed, losses = ckpt["step"] + 1, ckpt["elapsed"], list(ckpt["losses"])
        run.init_seconds, run.log = ckpt["init_seconds"], list(ckpt["log"])
        run.views, run.initial_views = ckpt["views"], ckpt["initial_views"]
        gen.set_state(ckpt["view_rng"])

    for step in range(first, cfg.steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        v = int(torch.randint(len(views), (1,), generator=gen))

        def loss_fn(with_meta: bool, v=v, step=step) -> tuple[torch.Tensor, Optional[dict]]:
            out = gaussians.render(model, views.camtoworlds[v], views.intrinsics[v], views.width, views.height,
                                   float(views.frame_ids[v]), with_meta=with_meta)
            meta = out.get("meta")
            if meta is not None:
                meta.setdefault("width", views.width)
                meta.setdefault("height", views.height)
            return sum(model.image_losses(out, views.images[v], step, model.sky_mask(views, v)).values()), meta

        loss = opt.step(step, loss_fn)
        losses.append(float(loss.detach()))  # the one host read per step (also syncs the device)
        elapsed += time.perf_counter() - t0
        entry = log(step) if step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0) else None
        if checkpoint is not None and (step == cfg.steps or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
            save(step)
        if entry is not None and progress is not None:
            progress(step, entry)  # after the checkpoint: an interrupted run resumes past this step
    if checkpoint is not None and first > cfg.steps:
        save(cfg.steps)
    run.static = raw_to_params({k: v.detach() for k, v in gaussians.static.raw.items()})
    run.num_actor_gaussians = len(gaussians.actors) if gaussians.actors is not None else 0
    return run


def finetune_report(runs: list[SegmentRun], cfg: FinetuneConfig) -> dict:
    """metrics.json: held-out metrics at the end (``summarise``: mean, per scene) and at step 0,
    the settings, and per segment the initialisation time and the optimisation time."""
    def per_scene(which: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in runs:
            for _, m in getattr(r, which):
                out.setdefault(r.key.scene, []).append(m)
        return out

    final = summarise(per_scene("views"))
    return {**final, "initial": summarise(per_scene("initial_views")),
            "steps": cfg.steps, "settings": {k: v for k, v in vars(cfg).items()},
            "segments": {str(r.key): {"init_seconds": r.init_seconds,
                                      "optimise_seconds": r.log[-1]["seconds"] if r.log else 0.0,
                                      "gaussians": len(r.static.means), "actor_gaussians": r.num_actor_gaussians}
                         for r in runs}}


def psnr_log(runs: list[SegmentRun]) -> dict:
    """psnr_log.json: per segment its initialisation time and the log points (PSNR vs seconds)."""
    return {str(r.key): {"init_seconds": r.init_seconds, "log": r.log} for r in runs}
