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
   run trained with sky supervision and its views carry sky masks), the model's rasteriser. No
   densification or pruning (the feed-forward prediction already places the Gaussians).
3. **Evaluation**: the segment's held-out views, scored by :func:`engine.evaluation.view_metrics`
   (the metrics of ``ns-eval`` / ``evolsplat-infer``), at the start and every ``eval_every`` steps;
   the clock (``seconds``) excludes these evaluations.

Frames: everything in the **segment frame**; cameras OpenCV camera-to-segment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

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


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class GaussianSet(nn.Module):
    """One set of Gaussians as raw parameters: means [N, 3], log scales [N, 3], quats [N, 4] (wxyz,
    normalised when read), opacity logits [N], SH DC [N, 1, 3] and rest [N, bases - 1, 3]."""

    def __init__(self, g: GaussianParams | ActorGaussians) -> None:
        super().__init__()
        self.means = nn.Parameter(g.means.detach().float().clone())
        self.log_scales = nn.Parameter(g.scales.detach().float().clamp(min=1e-6).log())
        self.quats = nn.Parameter(g.quats.detach().float().clone())
        self.opacity_logits = nn.Parameter(_logit(g.opacities.detach().float()))
        self.sh_dc = nn.Parameter(g.sh.detach().float()[:, :1].clone())
        self.sh_rest = nn.Parameter(g.sh.detach().float()[:, 1:].clone())

    def __len__(self) -> int:
        return self.means.shape[0]

    def params(self) -> GaussianParams:
        return GaussianParams(means=self.means, quats=self.quats / self.quats.norm(dim=-1, keepdim=True).clamp(min=1e-8),
                              scales=self.log_scales.exp(), opacities=torch.sigmoid(self.opacity_logits),
                              sh=torch.cat([self.sh_dc, self.sh_rest], dim=1))

    def param_groups(self, cfg: FinetuneConfig, extent: float, prefix: str) -> list[dict]:
        return [{"params": [self.means], "lr": cfg.lr_means * extent, "name": f"{prefix}means"},
                {"params": [self.log_scales], "lr": cfg.lr_scales, "name": f"{prefix}scales"},
                {"params": [self.quats], "lr": cfg.lr_quats, "name": f"{prefix}quats"},
                {"params": [self.opacity_logits], "lr": cfg.lr_opacities, "name": f"{prefix}opacities"},
                {"params": [self.sh_dc], "lr": cfg.lr_sh_dc, "name": f"{prefix}sh_dc"},
                {"params": [self.sh_rest], "lr": cfg.lr_sh_rest, "name": f"{prefix}sh_rest"}]


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
               time: Optional[float]) -> dict[str, torch.Tensor]:
        """rgb [H, W, 3], depth [H, W, 1], accumulation [H, W, 1] for an OpenCV camera-to-segment pose,
        through the model's rasteriser (same backend, same compositing)."""
        bg = self.background.params() if self.background is not None else None
        return model.rasterize_gaussians(self.foreground(time), bg, c2w, K, width, height)


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
        key: the segment. gaussians: the optimised Gaussians.
        init_seconds: the feed-forward initialisation (encodes and predictions).
        log: per log point ``step``, ``seconds`` (optimisation time so far, evaluations excluded),
            ``loss`` (mean since the last point), ``train_psnr``, ``held_out_psnr`` (None without held-out views).
        views: (name, metrics) of the held-out views at the end.
        initial_views: the same at step 0 (the merged feed-forward prediction).
    """

    key: SegmentKey
    gaussians: FinetuneGaussians
    init_seconds: float
    log: list[dict] = field(default_factory=list)
    views: list[tuple[str, dict]] = field(default_factory=list)
    initial_views: list[tuple[str, dict]] = field(default_factory=list)


def finetune_segment(model: EVolSplatModel, dataset: MultiSceneDataset, segment_index: int,
                     cfg: FinetuneConfig, progress: Optional[Callable[[int, dict], None]] = None) -> SegmentRun:
    """Initialise segment ``segment_index`` from the model's prediction and optimise it ``cfg.steps``
    steps on its training views (module doc); ``progress(step, entry)`` sees every log entry."""
    device = model.device
    model.eval()  # the networks only initialise; BatchNorm statistics stay as trained
    dataset.point_cloud(segment_index)  # data preparation (cached), not part of the timed prediction
    _sync(device)
    start = time.perf_counter()
    gaussians = predict_initial_gaussians(model, dataset, segment_index, cfg.ref_stride)
    _sync(device)
    init_seconds = time.perf_counter() - start
    views = training_views(dataset, segment_index).to(device)
    picks = sorted(set(np.linspace(0, len(views) - 1, min(cfg.max_train_eval_views, len(views))).round().astype(int)))
    extent = camera_extent(views)
    optimizer = torch.optim.Adam(gaussians.param_groups(cfg, extent), eps=1e-15)
    means_group = optimizer.param_groups[0]
    base_means_lr = means_group["lr"]
    gen = torch.Generator().manual_seed(cfg.seed)
    run = SegmentRun(gaussians.key, gaussians, init_seconds)
    elapsed, losses = 0.0, []

    def log(step: int) -> None:
        views_now = evaluate_segment(model, dataset, gaussians, segment_index)
        held = [m["psnr"] for _, m in views_now]
        entry = {"step": step, "seconds": elapsed, "loss": float(np.mean(losses)) if losses else None,
                 "train_psnr": _train_psnr(model, gaussians, views, picks),
                 "held_out_psnr": float(np.mean(held)) if held else None}
        run.log.append(entry)
        run.views = views_now
        if step == 0:
            run.initial_views = views_now
        losses.clear()
        if progress is not None:
            progress(step, entry)

    log(0)
    for step in range(1, cfg.steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        v = int(torch.randint(len(views), (1,), generator=gen))
        means_group["lr"] = base_means_lr * 0.01 ** ((step - 1) / max(1, cfg.steps))
        out = gaussians.render(model, views.camtoworlds[v], views.intrinsics[v], views.width, views.height,
                               float(views.frame_ids[v]))
        loss = sum(model.image_losses(out, views.images[v], step, model.sky_mask(views, v)).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))  # the one host read per step (also syncs the device)
        elapsed += time.perf_counter() - t0
        if step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            log(step)
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
                                      "gaussians": len(r.gaussians.static),
                                      "actor_gaussians": len(r.gaussians.actors) if r.gaussians.actors is not None else 0}
                         for r in runs}}


def psnr_log(runs: list[SegmentRun]) -> dict:
    """psnr_log.json: per segment its initialisation time and the log points (PSNR vs seconds)."""
    return {str(r.key): {"init_seconds": r.init_seconds, "log": r.log} for r in runs}
