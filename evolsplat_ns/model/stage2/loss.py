"""``Stage2CompleteLoss``: the stage-2 terms, each weighted by its ``Stage2Config`` weight.

Render terms (per target view; the refined actors are rasterised *with* the static scene and the
sky, and scored against the full image):

- ``s2_rgb`` = ``rgb_loss_weight`` · mean |Î − I| over the image;
- ``s2_depth`` = ``depth_loss_weight`` · mean |1/Ď − 1/D| over pixels with ground-truth depth D > 0
  (inverse depth: robust to far range);
- ``s2_lpips`` = ``lpips_loss_weight`` · LPIPS(Î, I), only with real pretrained LPIPS weights
  (:func:`evolsplat_ns.model.metrics.lpips_status`); otherwise off, and ``status()`` says why;
- registered extra terms (``extra_loss_terms``: registry group ``losses``, called with a
  :class:`Stage2TermInputs`), see docs/stage2.md for an edge-loss example.

Per-step terms (on the refine outputs):

- ``s2_reg_gauss`` = ``gaussian_reg_weight`` · Σ_s w_s mean ‖Δ_s‖² over the refined Gaussians'
  residual slices (w: xyz 1, scale 0.5, color 0.1, rot 0.5, opacity 0.1);
- ``s2_reg_pose`` = ``pose_reg_weight`` · mean over refined valid (k, t) of ‖ω‖² + ‖v‖² / ‖size_k‖²;
- ``s2_smooth`` = ``temporal_smooth_weight`` · mean over refined (k, t) with t-1, t, t+1 valid of
  ‖t(t+1) − 2 t(t) + t(t−1)‖² + ‖Log(R(t)ᵀR(t+1)) − Log(R(t−1)ᵀR(t))‖² on the corrected poses;
- ``s2_consistency`` = ``consistency_loss_weight`` · mean over refined actors of :func:`flow_consistency`
  (per target view: the refined, posed actor points must move by the observed flow to the next
  frame), only with trusted flow: the dataset's ``flow/``; otherwise off and ``status()`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from evolsplat_ns import registry
from evolsplat_ns.model.metrics import lpips_status
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.heads import GAUSSIAN_OUTPUT_LAYOUT
from evolsplat_ns.model.stage2.se3 import so3_log

DELTA_REG_WEIGHTS = {"d_xyz": 1.0, "d_log_scale": 0.5, "d_color": 0.1, "d_rot": 0.5, "d_opacity": 0.1}


@dataclass
class Stage2TermInputs:
    """What a per-target loss term sees. rgb/gt [H, W, 3] in [0, 1]; depth [H, W, 1] rendered
    (OpenCV z, m); gt_depth [H, W] (0 = unknown) or None; accumulation [H, W, 1]; step."""

    rgb: torch.Tensor
    gt: torch.Tensor
    depth: torch.Tensor
    gt_depth: Optional[torch.Tensor]
    accumulation: torch.Tensor
    step: int


def inverse_depth_l1(depth: torch.Tensor, gt_depth: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """mean |1/Ď − 1/D| over pixels with D > 0; None without ground truth (``gt_depth`` None, or a
    host map without a pixel D > 0). A device map is never read back (no sync): one without a
    pixel D > 0 gives 0, which supervises nothing (the model passes None for those, known on the host)."""
    if gt_depth is None:
        return None
    m = gt_depth > 0
    if gt_depth.device.type == "cpu" and not bool(m.any()):
        return None
    err = torch.where(m, (1.0 / depth[..., 0].clamp(min=1e-3) - 1.0 / gt_depth.clamp(min=1e-6)).abs(), 0.0)
    return err.sum() / m.sum().clamp(min=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean of ``values`` over ``mask`` (same shape, bool), 0 when empty; no host read (no sync)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def _delta_column_weights(delta: torch.Tensor) -> torch.Tensor:
    """[13] weight of each residual column (``DELTA_REG_WEIGHTS`` of its slice), cached per device and dtype."""
    key = (delta.device, delta.dtype)
    if key not in _DELTA_WEIGHTS:
        w = torch.zeros(delta.shape[-1], dtype=torch.float64)
        for name, weight in DELTA_REG_WEIGHTS.items():
            w[GAUSSIAN_OUTPUT_LAYOUT[name]] = weight
        with torch.inference_mode(False):
            _DELTA_WEIGHTS[key] = w.to(delta.device, delta.dtype)
    return _DELTA_WEIGHTS[key]


_DELTA_WEIGHTS: dict[tuple, torch.Tensor] = {}


def gaussian_reg(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_s w_s mean ‖Δ_s‖² over ``rows`` [N] bool of ``delta`` [N, 13] (0 without rows).

    Every slice is averaged over the same rows, so this is the mean over ``rows`` of the
    column-weighted Σ_j w_j Δ_j² (one masked mean instead of one per slice)."""
    return _masked_mean((delta * delta) @ _delta_column_weights(delta), rows)


def pose_reg(xi: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """mean over ``mask`` [K, F] of ‖ω‖² + ‖v‖² / ‖size‖² (``xi`` [K, F, 6], ``sizes`` [K, 3]; 0 when empty)."""
    term = xi[..., :3].pow(2).sum(-1) + xi[..., 3:].pow(2).sum(-1) / sizes.norm(dim=-1, keepdim=True).pow(2)
    return _masked_mean(term, mask)


def temporal_smoothness(poses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Second differences of translation and rotation of ``poses`` [K, F, 4, 4] over frames where
    ``mask`` [K, F] holds at t-1, t and t+1 (0 for constant-velocity tracks, and without such frames)."""
    if poses.shape[1] < 3:
        return poses.sum() * 0
    ok = mask[:, :-2] & mask[:, 1:-1] & mask[:, 2:]
    t = poses[..., :3, 3]
    acc = (t[:, 2:] - 2 * t[:, 1:-1] + t[:, :-2]).pow(2).sum(-1)
    R = poses[..., :3, :3]
    step = so3_log(R[:, :-1].transpose(-1, -2) @ R[:, 1:])  # [K, F-1, 3] rotation increments (object axes)
    rot = (step[:, 1:] - step[:, :-1]).pow(2).sum(-1)
    return _masked_mean(acc + rot, ok)


def flow_consistency(means_local: torch.Tensor, pose_t: torch.Tensor, pose_t1: torch.Tensor, K: torch.Tensor,
                     w2c_t: torch.Tensor, w2c_t1: torch.Tensor, flow: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Geometry-to-flow consistency of one object between frames t and t+1 of one camera.

    The object's points (``means_local`` [N, 3], object frame), posed at ``pose_t``/``pose_t1``
    [4, 4] (object->segment) and projected by ``K`` [3, 3] and the OpenCV world-to-camera poses
    ``w2c_t``/``w2c_t1`` [4, 4], must move by the observed flow ``flow`` [H, W, 2] (pixels, t->t+1)
    read at their frame-t pixel: Huber(δ = ``delta`` px) of the difference, divided by the image
    width, mean over points that project inside frame t in front of the camera (0 when none).
    """
    actor = torch.zeros(means_local.shape[0], dtype=torch.long, device=means_local.device)
    rows = torch.ones(1, dtype=torch.bool, device=means_local.device)
    return flow_consistency_objects(means_local, actor, pose_t[None], pose_t1[None], rows, K, w2c_t, w2c_t1, flow,
                                    delta)


def flow_consistency_objects(means_local: torch.Tensor, actor: torch.Tensor, poses_t: torch.Tensor,
                             poses_t1: torch.Tensor, rows: torch.Tensor, K: torch.Tensor, w2c_t: torch.Tensor,
                             w2c_t1: torch.Tensor, flow: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """:func:`flow_consistency` of several objects at once, mean over the objects ``rows`` [K] bool.

    ``means_local`` [N, 3] object-frame points, ``actor`` [N] their object row, ``poses_t`` /
    ``poses_t1`` [K, 4, 4] object->segment at t and t+1. Each object's value is its own mean over its
    points inside frame t (0 when none), so a large object does not outweigh a small one. Masked
    sums instead of boolean indexing: nothing is read back to the host (no device sync).
    """
    return flow_consistency_views(means_local, actor, poses_t[None], poses_t1[None], rows[None], K[None],
                                  w2c_t[None], w2c_t1[None], flow[None], delta)[0]


def flow_consistency_views(means_local: torch.Tensor, actor: torch.Tensor, poses_t: torch.Tensor,
                           poses_t1: torch.Tensor, rows: torch.Tensor, K: torch.Tensor, w2c_t: torch.Tensor,
                           w2c_t1: torch.Tensor, flow: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """:func:`flow_consistency_objects` of T views at once (one set of ops for all of them): [T].

    ``poses_t`` / ``poses_t1`` [T, K, 4, 4] object->segment at each view's t and t+1, ``rows``
    [T, K] bool the objects each view scores, ``K`` [T, 3, 3], ``w2c_t`` / ``w2c_t1`` [T, 4, 4]
    OpenCV world-to-camera, ``flow`` [T, H, W, 2] (pixels, t->t+1); ``means_local`` [N, 3] and
    ``actor`` [N] shared. Each point is taken to camera t (and t+1) by one composed transform
    ``w2c · pose`` per (view, object), then projected.
    """
    T, H, W = flow.shape[:3]

    def project(poses, w2c):
        G = (w2c[:, None] @ poses)[:, actor]  # [T, N, 4, 4] object -> camera of each point's object
        cam = (G[..., :3, :3] @ means_local[:, :, None])[..., 0] + G[..., :3, 3]  # [T, N, 3]
        pix = cam @ K.transpose(-1, -2)
        return pix[..., :2] / pix[..., 2:].clamp(min=1e-6), cam[..., 2]

    uv0, z0 = project(poses_t, w2c_t)
    uv1, _ = project(poses_t1, w2c_t1)
    u, v = uv0.unbind(-1)
    inside = (z0 > 1e-3) & (u >= 0) & (u < W) & (v >= 0) & (v < H) & rows[:, actor]
    px = uv0.detach().nan_to_num(0.0).floor().long()
    view = torch.arange(T, device=flow.device)[:, None]
    observed = flow[view, px[..., 1].clamp(0, H - 1), px[..., 0].clamp(0, W - 1)]  # [T, N, 2]
    residual = (uv1 - uv0 - observed).norm(dim=-1)
    huber = torch.where(residual < delta, 0.5 * residual ** 2, delta * (residual - 0.5 * delta))
    huber = torch.where(inside, huber, 0.0)
    num_rows = rows.shape[1]
    total = huber.new_zeros(T, num_rows).index_add(1, actor, huber)
    count = huber.new_zeros(T, num_rows).index_add(1, actor, inside.to(huber.dtype))
    per_object = total / count.clamp(min=1)
    return (per_object * rows).sum(-1) / rows.sum(-1).clamp(min=1) / W


class Stage2CompleteLoss:
    """The weighted stage-2 terms (see the module docstring); every term's key starts with ``s2_``."""

    def __init__(self, config: Stage2Config) -> None:
        self.config = config
        self.lpips_on, self.lpips_reason = lpips_status() if config.lpips_loss_weight > 0 else (False, "weight 0")
        self._lpips_net = None
        self.extra = {name: (registry.get("losses", name), w) for name, w in config.extra_loss_terms.items()}
        self.consistency_status = ("off (consistency_loss_weight 0)" if config.consistency_loss_weight <= 0 else
                                   "off (no step with trusted flow yet)")
        """Set by the model when it decides per target view (on with the dataset's flow, else off and why)."""

    def status(self) -> dict[str, str]:
        """Which optional terms are on, and why not."""
        return {"lpips": "on" if self.lpips_on else f"off ({self.lpips_reason})",
                "consistency": self.consistency_status}

    def render_terms(self, inputs: Stage2TermInputs) -> dict[str, torch.Tensor]:
        c = self.config
        terms = {"s2_rgb": c.rgb_loss_weight * (inputs.rgb - inputs.gt).abs().mean()}
        depth = inverse_depth_l1(inputs.depth, inputs.gt_depth)
        if depth is not None and c.depth_loss_weight > 0:
            terms["s2_depth"] = c.depth_loss_weight * depth
        if self.lpips_on:
            terms["s2_lpips"] = c.lpips_loss_weight * self._lpips(inputs.rgb, inputs.gt)
        for name, (term, weight) in self.extra.items():
            terms[f"s2_{name}"] = weight * term(inputs)
        return terms

    def step_terms(self, xi: torch.Tensor, delta: torch.Tensor, poses: torch.Tensor, valid: torch.Tensor,
                   refined: torch.Tensor, actor: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """xi [K, F, 6], delta [N, 13], corrected poses [K, F, 4, 4], valid [K, F], refined [K] bool,
        actor [N] row of each Gaussian, sizes [K, 3]."""
        c = self.config
        mask = valid & refined[:, None]
        return {"s2_reg_gauss": c.gaussian_reg_weight * gaussian_reg(delta, refined[actor]),
                "s2_reg_pose": c.pose_reg_weight * pose_reg(xi, mask, sizes),
                "s2_smooth": c.temporal_smooth_weight * temporal_smoothness(poses, mask)}

    def _lpips(self, rgb: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        from evolsplat_ns.model.metrics import _lpips_net  # the one loader of the pretrained network

        if self._lpips_net is None:
            self._lpips_net = _lpips_net(str(rgb.device))
            self._lpips_net.requires_grad_(False)
        to = lambda x: x.permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
        return self._lpips_net(to(rgb), to(gt)).reshape(())


def stage2_loss_class(name: str) -> type[Stage2CompleteLoss]:
    """``complete`` -> :class:`Stage2CompleteLoss`; any other name: a subclass registered in the
    ``losses`` group (``registry.register("losses", name, cls)`` or an entry point)."""
    if name == "complete":
        return Stage2CompleteLoss
    cls = registry.get("losses", name)
    if not (isinstance(cls, type) and issubclass(cls, Stage2CompleteLoss)):
        raise ValueError(f"stage2_loss={name!r} names {cls!r} in the losses group, which is not a "
                         "Stage2CompleteLoss subclass (a per-term function goes in extra_loss_terms instead)")
    return cls
