"""One training step's stage-2 run (:class:`Stage2Step`) and what it reports (:class:`Stage2Report`).

The refiner runs **once per step**. With per-target backward (the trainer's mode) its outputs are
cut into leaves: each target's stage-2 render terms are back-propagated with that target's loss
(gradients gather on the leaves), then :meth:`Stage2Step.finish` back-propagates the per-step terms
(regularisers, smoothness) and runs the refiner's graph once, **before** the shared stage-1 part and
before the optimizer step. Without per-target backward everything stays in one graph.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
from evolsplat_ns.model.predictor import _boundary_leaf  # the one gradient-boundary helper
from evolsplat_ns.model.stage2.loss import Stage2CompleteLoss, Stage2TermInputs, flow_consistency
from evolsplat_ns.model.stage2.processor import ObservedMotion
from evolsplat_ns.model.stage2.refiner import RefineOutput, Stage2Refiner
from evolsplat_ns.model.stage2.se3 import se3_log

OUTCOMES = ("ran", "no_objects", "nonfinite", "oom")


@dataclass
class Stage2Report:
    """What one scheduled stage-2 step did (read by the controller's statistics).

    outcome: one of ``OUTCOMES``; loss: total stage-2 loss (float, NaN if not ran); objects: refined
    objects; points_per_object: mean points the heads saw; trans_m / rot_deg: mean applied pose
    correction ‖v‖ (m) and ‖ω‖ (deg) over refined valid frames, relative to the boxes as the data
    gave them (the processor's fitted trajectory and the pose head's correction together);
    time_s: processor (when it ran for this step) + refine + loss + backward wall time
    (CUDA-synchronised), of which refine_s the refine heads' forward and process_s the processor's
    segmentation / flow / aggregation seconds; peak_mem_mb: peak CUDA memory above the entry
    allocation during the refine + loss + backward (0.0 on CPU); terms: the weighted terms."""

    outcome: str
    loss: float = math.nan
    objects: int = 0
    points_per_object: float = 0.0
    trans_m: float = 0.0
    rot_deg: float = 0.0
    time_s: float = 0.0
    refine_s: float = 0.0
    peak_mem_mb: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    process_s: dict[str, float] = field(default_factory=dict)


@dataclass
class FlowView:
    """Trusted flow of one target view to the same camera's next frame: flow [H, W, 2] (pixels,
    t -> t+1), col (the target frame's column in the actors' track), K [3, 3], w2c_t / w2c_t1
    [4, 4] OpenCV world(segment)-to-camera at t and t+1."""

    flow: torch.Tensor
    col: int
    K: torch.Tensor
    w2c_t: torch.Tensor
    w2c_t1: torch.Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stage2Step:
    """Refine a segment's actors once and hand the refined, posed actors to the renderer."""

    def __init__(self, refiner: Stage2Refiner, loss: Stage2CompleteLoss, actors: ActorGaussians, nodes: ActorNodes,
                 split_backward: bool, motion: Optional[ObservedMotion] = None,
                 process_s: Optional[dict[str, float]] = None) -> None:
        self.refiner, self.loss = refiner, loss
        self.device = actors.means.device
        _sync(self.device)
        self.start_time = time.perf_counter()
        self.start_mem = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mem = torch.cuda.memory_allocated(self.device)
        source = actors
        if refiner.config.detach_stage1:
            source = ActorGaussians(*(t.detach() for t in (actors.means, actors.quats, actors.scales,
                                                              actors.opacities, actors.sh)), actors.actor)
        self.box_poses = motion.box_poses if motion is not None else nodes.poses
        self.process_s = dict(process_s or {})
        out = refiner(source, nodes, motion)
        _sync(self.device)
        self.refine_s = time.perf_counter() - self.start_time
        self._boundary: list[tuple[torch.Tensor, torch.Tensor]] = []
        if split_backward and torch.is_grad_enabled():
            cut = lambda t: _boundary_leaf(t, self._boundary)  # noqa: E731
            g = out.gaussians
            out = RefineOutput(ActorGaussians(cut(g.means), cut(g.quats), cut(g.scales), cut(g.opacities), cut(g.sh),
                                              g.actor), cut(out.poses), cut(out.xi), cut(out.delta), out.refined,
                               out.points)
        self.out = out
        self.nodes = replace(nodes, poses=out.poses)
        self.nonfinite = False
        self.totals: dict[str, float] = {}

    @property
    def actors(self) -> ActorGaussians:
        """The refined actor Gaussians (object frames) to render."""
        return self.out.gaussians

    def target_terms(self, outputs: dict[str, torch.Tensor], gt: torch.Tensor, gt_depth: Optional[torch.Tensor],
                     step: int, num_targets: int, flow: Optional["FlowView"] = None) -> dict[str, torch.Tensor]:
        """Weighted render terms of one target (divided by ``num_targets``); {} once non-finite.
        With ``flow`` (trusted flow from the target's frame to the next) the cross-frame
        consistency term of the refined actors joins them."""
        if self.nonfinite:
            return {}
        terms = self.loss.render_terms(Stage2TermInputs(outputs["rgb"], gt, outputs["depth"], gt_depth,
                                                        outputs["accumulation"], step))
        if flow is not None and (term := self._consistency(flow)) is not None:
            terms["s2_consistency"] = term
        terms = {k: v / num_targets for k, v in terms.items()}
        if not all(bool(torch.isfinite(v)) for v in terms.values()):
            self.nonfinite = True
            return {}
        self._add(terms)
        return terms

    def _consistency(self, flow: "FlowView") -> Optional[torch.Tensor]:
        """Weighted mean :func:`flow_consistency` over refined actors valid at both frames (None: none)."""
        o, valid = self.out, self.nodes.valid
        if flow.col + 1 >= valid.shape[1]:
            return None
        rows = (valid[:, flow.col] & valid[:, flow.col + 1] & o.refined).nonzero()[:, 0].tolist()
        g = o.gaussians
        values = [flow_consistency(g.means[g.actor == k], o.poses[k, flow.col], o.poses[k, flow.col + 1], flow.K,
                                   flow.w2c_t, flow.w2c_t1, flow.flow) for k in rows]
        if not values:
            return None
        return self.loss.config.consistency_loss_weight * torch.stack(values).mean()

    def step_terms(self) -> dict[str, torch.Tensor]:
        o = self.out
        return self.loss.step_terms(o.xi, o.delta, o.poses, self.nodes.valid, o.refined, o.gaussians.actor,
                                    self.nodes.sizes)

    def finish(self, backward: Optional[Callable[[torch.Tensor], None]]) -> dict[str, torch.Tensor]:
        """Per-step terms; with ``backward`` they are back-propagated and the refiner's graph runs
        once (returns them detached), else they are returned in the graph for the caller."""
        terms = self.step_terms()
        if not all(bool(torch.isfinite(v)) for v in terms.values()):
            self.nonfinite = True
        if self.nonfinite:
            self._boundary = []
            self.refiner.zero_grad(set_to_none=True)
            return {}
        self._add(terms)
        if backward is not None:
            backward(sum(terms.values()))
            pairs = [(graph, leaf.grad) for graph, leaf in self._boundary if leaf.grad is not None]
            self._boundary = []
            if pairs:
                torch.autograd.backward([g for g, _ in pairs], [d for _, d in pairs])
            terms = {k: v.detach() for k, v in terms.items()}
        return terms

    def discard(self) -> None:
        """Drop the refiner's gradients of this step (non-finite loss)."""
        self.nonfinite = True
        self._boundary = []
        self.refiner.zero_grad(set_to_none=True)

    def report(self) -> Stage2Report:
        _sync(self.device)
        elapsed = time.perf_counter() - self.start_time
        peak = 0.0
        if self.device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(self.device) - self.start_mem) / 2**20
        if self.nonfinite:
            return Stage2Report("nonfinite", time_s=elapsed)
        o = self.out
        mask = self.nodes.valid & o.refined[:, None]
        xi = se3_log(torch.linalg.solve(self.box_poses.double(), o.poses.detach().double()))[mask]
        trans = float(xi[:, 3:].norm(dim=-1).mean()) if xi.shape[0] else 0.0
        rot = float(xi[:, :3].norm(dim=-1).mean()) * 180 / math.pi if xi.shape[0] else 0.0
        refined = int(o.refined.sum())
        ppo = float(o.points[o.refined].float().mean()) if refined else 0.0
        extra = sum(self.process_s.values())
        return Stage2Report("ran", sum(self.totals.values()), refined, ppo, trans, rot, elapsed + extra, self.refine_s,
                            peak, dict(self.totals), self.process_s)

    def _add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.totals[k] = self.totals.get(k, 0.0) + float(v.detach())
