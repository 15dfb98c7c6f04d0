"""``Stage2Refiner``: both refine heads applied to one segment's actors.

Input: the stage-1 actor Gaussians (object frames, :class:`ActorGaussians`) and the actors' box
tracks (:class:`ActorNodes`, poses object->segment [K, F, 4, 4]). Output: refined Gaussians (same
rows, object frames), corrected poses ``T_box · Exp_SE3(xi)`` [K, F, 4, 4] (a right-multiplication:
the correction is in the object's own axes), and the raw residuals for the regularisers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from evolsplat_ns.geometry import quat_multiply
from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
from evolsplat_ns.model.stage2.config import Stage2Config, Stage2Mode
from evolsplat_ns.model.stage2.heads import GAUSSIAN_INPUT_LAYOUT as IN
from evolsplat_ns.model.stage2.heads import GAUSSIAN_OUTPUT_LAYOUT as OUT
from evolsplat_ns.model.stage2.heads import OUTPUT_GAUSSIAN_DIM, GaussianRefineHead, PoseRefineHead
from evolsplat_ns.model.stage2.heads import MAX_ROT_CORRECTION, MAX_TRANS_CORRECTION
from evolsplat_ns.model.stage2.processor import ObservedMotion
from evolsplat_ns.model.stage2.se3 import quat_exp, se3_exp


@dataclass
class RefineOutput:
    """Attributes: gaussians (refined, object frames); poses [K, F, 4, 4] corrected object->segment;
    xi [K, F, 6] applied twists (0 where not refined/valid); delta [N, 13] Gaussian residuals (0 for
    Gaussians outside the point budget); refined [K] bool objects the heads saw; points [K] points each saw."""

    gaussians: ActorGaussians
    poses: torch.Tensor
    xi: torch.Tensor
    delta: torch.Tensor
    refined: torch.Tensor
    points: torch.Tensor


def gaussian_vector(g: ActorGaussians, sizes: torch.Tensor) -> torch.Tensor:
    """[N, 14] input vectors in ``GAUSSIAN_INPUT_LAYOUT`` (``sizes`` [K, 3] box l, w, h)."""
    half = 0.5 * sizes[g.actor].clamp(min=1e-3)
    opac = g.opacities.clamp(1e-6, 1 - 1e-6)
    return torch.cat([g.means / half, g.scales.clamp(min=1e-8).log(), g.sh[:, 0], g.quats,
                      (opac / (1 - opac)).log()[:, None]], dim=-1)


def apply_delta(g: ActorGaussians, delta: torch.Tensor, sizes: torch.Tensor) -> ActorGaussians:
    """Refined Gaussians; a zero ``delta`` [N, 13] returns every attribute exactly."""
    extent = sizes[g.actor].norm(dim=-1, keepdim=True)
    means = g.means + 0.05 * extent * torch.tanh(delta[:, OUT["d_xyz"]])
    scales = g.scales * torch.exp(0.5 * torch.tanh(delta[:, OUT["d_log_scale"]]))
    sh = torch.cat([g.sh[:, :1] + delta[:, None, OUT["d_color"]], g.sh[:, 1:]], dim=1)
    quats = quat_multiply(g.quats, quat_exp(delta[:, OUT["d_rot"]]))
    e = torch.exp(delta[:, OUT["d_opacity"]][:, 0])
    opacities = g.opacities * e / (1 + g.opacities * (e - 1))  # sigmoid(logit(o) + d), exact at d = 0
    return ActorGaussians(means, quats, scales, opacities, sh, g.actor)


class Stage2Refiner(nn.Module):
    """GaussianRefineHead + PoseRefineHead, with the training mode and the adaptive point budget."""

    def __init__(self, config: Stage2Config) -> None:
        super().__init__()
        c = config
        self.config = config
        self.gaussian_head = GaussianRefineHead(c.input_gaussian_dim, c.gaussian_feature_dim, c.gaussian_num_layers,
                                                c.gaussian_num_heads)
        self.pose_head = PoseRefineHead(c.input_gaussian_dim, c.pose_feature_dim, c.pose_num_layers,
                                        c.gaussian_num_heads)
        self.mode: Stage2Mode = c.stage2_training_mode
        self.point_budget = c.max_points_per_object

    def trainable_parameters(self, mode: Stage2Mode | None = None) -> list[nn.Parameter]:
        """Parameters of the heads that ``mode`` trains (the others leave the optimizer)."""
        mode = mode or self.mode
        heads: Iterator[nn.Module] = {"joint": (self.gaussian_head, self.pose_head),
                                      "gaussian_only": (self.gaussian_head,),
                                      "pose_only": (self.pose_head,)}[mode]
        return [p for head in heads for p in head.parameters()]

    def objects(self, nodes: ActorNodes) -> list[int]:
        """Rows refined: actors with a valid frame and points, at most ``max_objects_per_frame`` (most points first)."""
        counts = torch.bincount(nodes.actor, minlength=nodes.num_actors)
        rows = [k for k in range(nodes.num_actors) if bool(nodes.valid[k].any()) and int(counts[k]) > 0]
        rows.sort(key=lambda k: -int(counts[k]))
        return sorted(rows[:self.config.max_objects_per_frame])

    def forward(self, g: ActorGaussians, nodes: ActorNodes, motion: Optional[ObservedMotion] = None) -> RefineOutput:
        """Refine the actors' Gaussians ``g`` (object frames) and the poses of ``nodes`` (the boxes,
        or the processor's fitted poses once it ran); ``motion`` (the processor's observation of
        these actors) is the pose head's per-frame evidence."""
        vec = gaussian_vector(g, nodes.sizes)
        delta = vec.new_zeros(len(g.actor), OUTPUT_GAUSSIAN_DIM)
        xi = vec.new_zeros(*nodes.poses.shape[:2], 6)
        refined = torch.zeros(nodes.num_actors, dtype=torch.bool, device=vec.device)
        points = torch.zeros(nodes.num_actors, dtype=torch.long, device=vec.device)
        budget = self.point_budget if self.config.stage2_memory_efficient else 0
        deltas, rows_idx, xis, xi_rows = [], [], [], []
        for k in self.objects(nodes):
            idx = (g.actor == k).nonzero()[:, 0]
            if 0 < budget < idx.numel():  # fixed per object, so a run is reproducible
                idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(k))[:budget].to(idx.device)]
            refined[k], points[k] = True, idx.numel()
            if self.mode != "pose_only":
                deltas.append(self.gaussian_head(vec[idx], checkpoint=self.config.stage2_memory_efficient)[0])
                rows_idx.append(idx)
            if self.mode != "gaussian_only":
                xis.append(self.pose_head(vec[idx], nodes.poses[k].to(vec.dtype), nodes.valid[k], nodes.sizes[k],
                                          _evidence(motion, k)))
                xi_rows.append(k)
        if deltas:
            delta = delta.index_put((torch.cat(rows_idx),), torch.cat(deltas))
        if xis:
            xi = xi.index_put((torch.tensor(xi_rows, device=vec.device),), torch.stack(xis))
        poses = nodes.poses.to(vec.dtype) @ se3_exp(xi)
        return RefineOutput(apply_delta(g, delta, nodes.sizes), poses, xi, delta, refined, points)


def _evidence(motion: Optional[ObservedMotion], k: int) -> Optional[torch.Tensor]:
    """[F, 7] pose-head evidence of actor ``k``: the observed correction of its box in units of the
    head's output bounds (rotation, translation) and the observation weight; None without."""
    if motion is None:
        return None
    xi = motion.xi[k]
    scaled = torch.cat([xi[:, :3] / MAX_ROT_CORRECTION, xi[:, 3:] / MAX_TRANS_CORRECTION], -1)
    return torch.cat([scaled, motion.weight[k][:, None]], -1)
