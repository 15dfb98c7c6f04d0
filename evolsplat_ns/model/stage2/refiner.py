"""``Stage2Refiner``: both refine heads applied to one segment's actors.

Input: the stage-1 actor Gaussians (object frames, :class:`ActorGaussians`) and the actors' box
tracks (:class:`ActorNodes`, poses object->segment [K, F, 4, 4]). Output: refined Gaussians (same
rows, object frames), corrected poses ``T_box · Exp_SE3(xi)`` [K, F, 4, 4] (a right-multiplication:
the correction is in the object's own axes), and the raw residuals for the regularisers.
"""

from __future__ import annotations

from collections import OrderedDict
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
    Gaussians outside the point budget); refined [K] bool objects the heads saw; points [K] points
    each saw; quats [K, F, 4] the corrected rotations as wxyz quaternions (w >= 0), ``q_box ⊗
    Exp(omega)``: what the renderer composes with each Gaussian's, so no target converts matrices."""

    gaussians: ActorGaussians
    poses: torch.Tensor
    xi: torch.Tensor
    delta: torch.Tensor
    refined: torch.Tensor
    points: torch.Tensor
    quats: torch.Tensor


@dataclass
class RefinePlan:
    """What a refine run of one segment's actors selects, constant while the segment's actor rows
    and the point budget stay (built once per segment visit, so a step reads nothing back).

    Attributes: rows (host) the refined actor rows, ascending; index [M] device long, the Gaussian
    rows each head sees, concatenated over ``rows`` (each row's point-budget subset); splits (host)
    how many of ``index`` belong to each row; refined [K] device bool; points [K] device long;
    refined_host / points_host their host copies; rows_t [R] device long; valid_host [K, F] host bool;
    points_mean the mean points per refined row (0.0 without); pair_rows[c] whether a refined row is
    valid at columns c and c + 1 (host bools).

    Padded batches (:class:`PaddedBatch`): ``batch``, every refined row padded to the largest
    subset (the pose head's one call: its point cost is linear, padding costs little there), and
    ``groups``, the same rows in size classes (:data:`GROUP_RATIO`) for the Gaussian head, whose
    attention costs P² per object: one call per class (one class when the sizes are alike)."""

    rows: list[int]
    index: torch.Tensor
    splits: list[int]
    refined: torch.Tensor
    points: torch.Tensor
    refined_host: torch.Tensor
    points_host: torch.Tensor
    rows_t: torch.Tensor
    valid_host: torch.Tensor
    points_mean: float = 0.0
    pair_rows: tuple[bool, ...] = ()
    batch: Optional["PaddedBatch"] = None
    groups: tuple["PaddedBatch", ...] = ()

    @property
    def padded_points(self) -> int:
        """Rows the Gaussian head computes over its groups (padding included: its activations scale with it)."""
        return sum(int(b.index.numel()) for b in self.groups)


@dataclass
class PaddedBatch:
    """Object subsets padded into one [B, P] batch (device tensors).

    Attributes: index [B, P] long, Gaussian rows (each object's subset, padded with its own first
    Gaussian, so padding rows hold finite values); mask [B, P] bool, True on the real entries; flat
    [M] long, where the real entries sit in the flattened [B * P] batch; rows [M] long, their
    Gaussian rows (``index.reshape(-1)[flat]``): outputs go back by ``out.reshape(B * P,
    -1)[flat]`` -> ``rows`` with no boolean index (no host read)."""

    index: torch.Tensor
    mask: torch.Tensor
    flat: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def of(cls, chosen: list[torch.Tensor], device: torch.device) -> "PaddedBatch":
        """From per-object Gaussian row subsets ``chosen`` (host long tensors, each non-empty)."""
        P = max(int(i.numel()) for i in chosen)
        index = torch.stack([torch.cat([i, i[:1].expand(P - i.numel())]) for i in chosen])
        mask = torch.stack([torch.arange(P) < i.numel() for i in chosen])
        flat = mask.reshape(-1).nonzero()[:, 0]  # row-major: the order of torch.cat(chosen)
        return cls(index.to(device), mask.to(device), flat.to(device), index.reshape(-1)[flat].to(device))


GROUP_RATIO = 4.0
"""The Gaussian head's size classes: objects sorted by points, a class ends where an object has
fewer than 1 / ``GROUP_RATIO`` of the class's largest (so padding costs a member at most
``GROUP_RATIO``² its own attention). ``math.inf``: all objects in one call. Read when a plan is built."""


CHECKPOINT_ABOVE_BYTES = 512 * 2**20
"""In memory-efficient mode the Gaussian head's attention blocks are checkpointed (recomputed in
the backward) only when a run's estimated block activations exceed this: below it the recompute
costs time and saves little (the standard preset, 10 objects padded to 2048 points x 128
features, holds about 250 MiB of them)."""
ACTIVATION_FLOATS_PER_FEATURE = 12
"""Floats a pre-LN attention block keeps per point and feature for its backward (two norms, q/k/v,
attention output, the 2x MLP hidden before and after GELU): the estimate behind the checkpoint choice."""

PLAN_CACHE_SIZE = 8
"""Refine plans kept (one per segment visit: a segment's actors on the device are one set of tensors)."""


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
        self._plans: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, RefinePlan]] = OrderedDict()

    def trainable_parameters(self, mode: Stage2Mode | None = None) -> list[nn.Parameter]:
        """Parameters of the heads that ``mode`` trains (the others leave the optimizer)."""
        mode = mode or self.mode
        heads: Iterator[nn.Module] = {"joint": (self.gaussian_head, self.pose_head),
                                      "gaussian_only": (self.gaussian_head,),
                                      "pose_only": (self.pose_head,)}[mode]
        return [p for head in heads for p in head.parameters()]

    def objects(self, nodes: ActorNodes) -> list[int]:
        """Rows refined: actors with a valid frame and points, at most ``max_objects_per_frame`` (most points first)."""
        return list(self.plan(nodes).rows)

    def activation_bytes(self, plan: RefinePlan) -> int:
        """Estimated bytes the Gaussian head's attention blocks keep for the backward over a run: of
        its padded batches (per size class, objects x the class's largest subset; padding rows are
        computed too). Attention weights are not counted: the fused attention kernels on CUDA do
        not keep them."""
        c = self.config
        return plan.padded_points * c.gaussian_feature_dim * c.gaussian_num_layers * ACTIVATION_FLOATS_PER_FEATURE * 4

    def plan(self, nodes: ActorNodes) -> RefinePlan:
        """The :class:`RefinePlan` of ``nodes`` at the current point budget and mode, cached: keyed by
        the identity of the actor-row and validity tensors (a segment's actors keep them while they
        stay on the device; the cache holds them, so an id is not reused while cached)."""
        budget = self.point_budget if self.config.stage2_memory_efficient else 0
        key = (id(nodes.actor), id(nodes.valid), budget, self.config.max_objects_per_frame)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is nodes.actor and hit[1] is nodes.valid:
            self._plans.move_to_end(key)
            return hit[2]
        plan = self._build_plan(nodes, budget)
        self._plans[key] = (nodes.actor, nodes.valid, plan)
        while len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _build_plan(self, nodes: ActorNodes, budget: int) -> RefinePlan:
        actor = nodes.actor.cpu()  # once per segment visit (the plan is cached)
        valid = nodes.valid.cpu()
        K, device = nodes.num_actors, nodes.actor.device
        counts = torch.bincount(actor, minlength=K)
        rows = [k for k in range(K) if bool(valid[k].any()) and int(counts[k]) > 0]
        rows.sort(key=lambda k: -int(counts[k]))
        rows = sorted(rows[:self.config.max_objects_per_frame])
        refined, points = torch.zeros(K, dtype=torch.bool), torch.zeros(K, dtype=torch.long)
        chosen = []
        for k in rows:
            idx = (actor == k).nonzero()[:, 0]
            if 0 < budget < idx.numel():  # fixed per object, so a run is reproducible
                idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(k))[:budget]]
            refined[k], points[k] = True, idx.numel()
            chosen.append(idx)
        index = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
        batch = PaddedBatch.of(chosen, device) if chosen else None
        groups = tuple(PaddedBatch.of([chosen[j] for j in g], device) for g in size_classes(
            [int(i.numel()) for i in chosen], GROUP_RATIO)) if chosen else ()
        if len(groups) == 1:
            groups = (batch,)  # one class: the same batch (same order), built once
        return RefinePlan(rows, index.to(device), [int(i.numel()) for i in chosen], refined.to(device),
                          points.to(device), refined, points, torch.tensor(rows, dtype=torch.long).to(device), valid,
                          sum(i.numel() for i in chosen) / len(chosen) if chosen else 0.0,
                          tuple((valid[:, :-1] & valid[:, 1:] & refined[:, None]).any(0).tolist()), batch, groups)

    def forward(self, g: ActorGaussians, nodes: ActorNodes, motion: Optional[ObservedMotion] = None) -> RefineOutput:
        """Refine the actors' Gaussians ``g`` (object frames) and the poses of ``nodes`` (the boxes,
        or the processor's fitted poses once it ran); ``motion`` (the processor's observation of
        these actors) is the pose head's per-frame evidence.

        The refined objects go through the heads batched: their point-budget subsets padded into
        [B, P, 14] with a mask, the pose head in one call over all of them, the Gaussian head in one
        call per size class (:class:`RefinePlan`), outputs scattered back. Same result as
        :meth:`forward_reference` (one call per object), to float rounding."""
        plan = self.plan(nodes)
        vec = gaussian_vector(g, nodes.sizes)
        delta = vec.new_zeros(len(g.actor), OUTPUT_GAUSSIAN_DIM)
        xi = vec.new_zeros(*nodes.poses.shape[:2], 6)
        if plan.rows:
            full = vec[plan.batch.index]  # [R, P, 14]: every refined object padded to the largest
            if self.mode != "pose_only":
                checkpoint = self._checkpoint(plan)
                for b in plan.groups:
                    out = self.gaussian_head(full if b is plan.batch else vec[b.index], checkpoint=checkpoint,
                                             mask=b.mask)[0]  # [B, P, 13]
                    delta = delta.index_put((b.rows,), out.reshape(-1, out.shape[-1]).index_select(0, b.flat))
            if self.mode != "gaussian_only":
                rows, b = plan.rows_t, plan.batch
                evidence = _evidence(motion)
                xis = self.pose_head(full, nodes.poses.to(vec.dtype).index_select(0, rows),
                                     nodes.valid.index_select(0, rows), nodes.sizes.index_select(0, rows),
                                     evidence.index_select(0, rows) if evidence is not None else None, mask=b.mask)
                xi = xi.index_put((rows,), xis)
        return self._output(g, nodes, plan, delta, xi)

    def forward_reference(self, g: ActorGaussians, nodes: ActorNodes,
                          motion: Optional[ObservedMotion] = None) -> RefineOutput:
        """:meth:`forward` one object at a time (each head called per object on its own subset, no
        padding): the readable reference the batched path is tested against."""
        plan = self.plan(nodes)
        vec = gaussian_vector(g, nodes.sizes)
        delta = vec.new_zeros(len(g.actor), OUTPUT_GAUSSIAN_DIM)
        xi = vec.new_zeros(*nodes.poses.shape[:2], 6)
        if plan.rows:
            chosen = vec[plan.index].split(plan.splits)
            if self.mode != "pose_only":
                deltas = [self.gaussian_head(v, checkpoint=self._checkpoint(plan))[0] for v in chosen]
                delta = delta.index_put((plan.index,), torch.cat(deltas))
            if self.mode != "gaussian_only":
                poses, evidence = nodes.poses.to(vec.dtype), _evidence(motion)
                xis = [self.pose_head(v, poses[k], nodes.valid[k], nodes.sizes[k],
                                      evidence[k] if evidence is not None else None)
                       for k, v in zip(plan.rows, chosen)]
                xi = xi.index_put((plan.rows_t,), torch.stack(xis))
        return self._output(g, nodes, plan, delta, xi)

    def _checkpoint(self, plan: RefinePlan) -> bool:
        return self.config.stage2_memory_efficient and self.activation_bytes(plan) > CHECKPOINT_ABOVE_BYTES

    def _output(self, g: ActorGaussians, nodes: ActorNodes, plan: RefinePlan, delta: torch.Tensor,
                xi: torch.Tensor) -> RefineOutput:
        poses = nodes.poses.to(delta.dtype) @ se3_exp(xi)
        quats = quat_multiply(nodes.box_quats().to(delta.dtype), quat_exp(xi[..., :3]))
        quats = quats * torch.where(quats[..., :1] < 0, -1.0, 1.0)  # w >= 0, as matrix_to_quat gives
        return RefineOutput(apply_delta(g, delta, nodes.sizes), poses, xi, delta, plan.refined, plan.points, quats)


def size_classes(points: list[int], ratio: float) -> list[list[int]]:
    """Positions of ``points`` (per object) in classes: sorted by points, largest first, a class
    ends before an object with fewer than its largest / ``ratio`` (each class in ascending position)."""
    order = sorted(range(len(points)), key=lambda j: -points[j])
    classes: list[list[int]] = []
    for j in order:
        if not classes or points[j] * ratio < points[classes[-1][0]]:
            classes.append([])
        classes[-1].append(j)
    return [sorted(c) for c in classes]


def _evidence(motion: Optional[ObservedMotion]) -> Optional[torch.Tensor]:
    """[K, F, 7] pose-head evidence of every actor: the observed correction of its box in units of
    the head's output bounds (rotation, translation) and the observation weight; None without."""
    if motion is None:
        return None
    xi = motion.xi
    scaled = torch.cat([xi[..., :3] / MAX_ROT_CORRECTION, xi[..., 3:] / MAX_TRANS_CORRECTION], -1)
    return torch.cat([scaled, motion.weight[..., None].to(xi.dtype)], -1)
