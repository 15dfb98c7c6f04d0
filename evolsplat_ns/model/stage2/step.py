"""One training step's stage-2 run (:class:`Stage2Step`) and what it reports (:class:`Stage2Report`).

The refiner runs **once per step**. With per-target backward (the trainer's mode) its outputs are
cut into leaves: each target's stage-2 render terms are back-propagated with that target's loss
(gradients gather on the leaves), then :meth:`Stage2Step.finish` back-propagates the per-step terms
(regularisers, smoothness) and runs the refiner's graph once, **before** the shared stage-1 part and
before the optimizer step. Without per-target backward everything stays in one graph.

Host reads: a run reads the device once (:meth:`Stage2Step.finish`: whether every stage-2 term
and the stage-1 loss are finite, the loss totals and the applied pose correction, one transfer),
and synchronises once at its start and once at its end for the CUDA-synchronised time. Term totals
stay on the device; a target's non-finite stage-2 term is gated on the device (its value counts 0
and no gradient of it reaches stage 1, see :class:`_GradGate`), the finiteness being known on the
host only at that one read; the run is then reported ``nonfinite`` and its refiner gradients dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from evolsplat_ns.geometry import invert_rigid
from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
from evolsplat_ns.model.predictor import _boundary_leaf  # the one gradient-boundary helper
from evolsplat_ns.model.stage2.loss import Stage2CompleteLoss, Stage2TermInputs, flow_consistency_views
from evolsplat_ns.model.stage2.processor import ObservedMotion
from evolsplat_ns.model.stage2.refiner import RefineOutput, RefinePlan, Stage2Refiner
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


class _RunTimer:
    """Wall time of one run: the device is synchronised at :meth:`__init__` and at :meth:`stop`
    only; the refine part is timed by CUDA events in between (no sync), by the clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _sync(device)
        self.start = time.perf_counter()
        self._events: Optional[list] = None
        if device.type == "cuda":
            self._events = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            self._events[0].record()
        self._refine_s = 0.0

    def mark_refine(self) -> None:
        if self._events is not None:
            self._events[1].record()
        else:
            self._refine_s = time.perf_counter() - self.start

    def stop(self) -> tuple[float, float]:
        """(seconds since the start, seconds of the refine part), after one device sync."""
        _sync(self.device)
        elapsed = time.perf_counter() - self.start
        if self._events is not None:
            return elapsed, self._events[0].elapsed_time(self._events[1]) / 1e3
        return elapsed, self._refine_s


class _GradGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient where ``gate`` (a device bool scalar, read at
    backward time so it may be set after the forward) holds, zero otherwise: a non-finite stage-2
    term's gradient never reaches stage 1, and no host read is needed to decide it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.gate = gate
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return torch.where(ctx.gate, grad, torch.zeros_like(grad)), None


def _gated(x: Optional[torch.Tensor], gate: torch.Tensor) -> Optional[torch.Tensor]:
    return _GradGate.apply(x, gate) if x is not None and x.requires_grad else x


class Stage2Step:
    """Refine a segment's actors once and hand the refined, posed actors to the renderer."""

    def __init__(self, refiner: Stage2Refiner, loss: Stage2CompleteLoss, actors: ActorGaussians, nodes: ActorNodes,
                 split_backward: bool, motion: Optional[ObservedMotion] = None,
                 process_s: Optional[dict[str, float]] = None) -> None:
        self.refiner, self.loss = refiner, loss
        self.device = actors.means.device
        self.timer = _RunTimer(self.device)
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
        self.plan: RefinePlan = refiner.plan(nodes)
        out = refiner(source, nodes, motion)
        self.timer.mark_refine()
        self._boundary: list[tuple[torch.Tensor, torch.Tensor]] = []
        if split_backward and torch.is_grad_enabled():
            cut = lambda t: _boundary_leaf(t, self._boundary)  # noqa: E731
            g = out.gaussians
            out = RefineOutput(ActorGaussians(cut(g.means), cut(g.quats), cut(g.scales), cut(g.opacities), cut(g.sh),
                                              g.actor), cut(out.poses), cut(out.xi), cut(out.delta), out.refined,
                               out.points, cut(out.quats))
        self.out = out
        self.nodes = nodes.with_poses(out.poses, out.quats)  # every target places the refined poses as given
        self.nonfinite = False
        """Known on the host: set by :meth:`discard` and by :meth:`finish`'s one read."""
        self.stage1_finite = True
        """Set by :meth:`finish` (the stage-1 total it was given was finite)."""
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        """Device flag: every stage-2 term so far is finite."""
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}
        """Detached weighted terms summed over the run, one device vector per tuple of term names."""
        self._flows: list[tuple[FlowView, int]] = []
        """(flow view, the step's target count) of each target scored so far with trusted flow:
        the consistency term is computed for all of them at once in :meth:`finish`."""
        self._read: Optional[dict[str, float]] = None

    @property
    def actors(self) -> ActorGaussians:
        """The refined actor Gaussians (object frames) to render."""
        return self.out.gaussians

    @property
    def totals(self) -> dict[str, float]:
        """The weighted terms summed over the run (host floats; after :meth:`finish`)."""
        return {k: v for k, v in (self._read or {}).items() if k.startswith("s2_")}

    def target_terms(self, outputs: dict[str, torch.Tensor], gt: torch.Tensor, gt_depth: Optional[torch.Tensor],
                     step: int, num_targets: int, flow: Optional["FlowView"] = None) -> dict[str, torch.Tensor]:
        """Weighted render terms of one target (divided by ``num_targets``). With ``flow`` (trusted
        flow from the target's frame to the next) the target joins the cross-frame consistency term
        of the refined actors, which :meth:`finish` computes for every such target at once (it
        reads only the refined actors and the flow, not the render). Nothing is read back: once any
        term of the run is non-finite, this and later targets' terms are 0 with no gradient into
        stage 1 (decided on the device), and :meth:`finish` reports the run non-finite."""
        if self.nonfinite:
            return {}
        gate = torch.ones((), dtype=torch.bool, device=self.device)
        terms = self.loss.render_terms(Stage2TermInputs(_gated(outputs["rgb"], gate), gt, _gated(outputs["depth"], gate),
                                                        gt_depth, _gated(outputs["accumulation"], gate), step))
        if flow is not None and flow.col < len(self.plan.pair_rows) and self.plan.pair_rows[flow.col]:
            self._flows.append((flow, num_targets))
        if not terms:
            return {}
        names, values = self._stacked(terms)
        values = values / num_targets
        ok = self._finite & torch.isfinite(values.detach()).all()
        gate.copy_(ok)  # read by the gates' backward: a non-finite target sends no gradient to stage 1
        self._finite = ok
        values = torch.where(ok, values, torch.zeros_like(values))
        self._add(names, values)
        return dict(zip(names, values.unbind()))

    @staticmethod
    def _stacked(terms: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
        """(names, [n] vector of the scalar terms): the per-term bookkeeping (scaling, gating, sums,
        finiteness) then costs one op for all of them."""
        dtype = terms[next(iter(terms))].dtype
        for v in terms.values():
            dtype = torch.promote_types(dtype, v.dtype)
        return tuple(terms), torch.stack([v.reshape(()).to(dtype) for v in terms.values()])

    def _consistency(self) -> Optional[torch.Tensor]:
        """Weighted :func:`flow_consistency_views` of every target scored with flow (each divided by
        its step's target count, as its render terms are), over the refined actors valid at the
        target's frame and the next (None without such targets). One batched call per flow shape."""
        if not self._flows:
            return None
        plan, o = self.plan, self.out
        groups: dict[tuple, list[tuple[FlowView, int]]] = {}
        for view, n in self._flows:
            groups.setdefault(tuple(view.flow.shape), []).append((view, n))
        total = None
        for items in groups.values():
            views = [v for v, _ in items]
            cols = [v.col for v in views]
            T = len(cols)
            index = torch.tensor(cols + [c + 1 for c in cols], dtype=torch.long).to(self.device, non_blocking=True)
            poses = o.poses.index_select(1, index).transpose(0, 1)  # [2T, K, 4, 4]: frames t, then t + 1
            c = torch.tensor(cols)
            rows = (plan.valid_host[:, c] & plan.valid_host[:, c + 1] & plan.refined_host[:, None]).T  # host [T, K]
            stack = lambda name: torch.stack([getattr(v, name) for v in views])  # noqa: E731
            values = flow_consistency_views(o.gaussians.means, o.gaussians.actor, poses[:T], poses[T:],
                                            rows.contiguous().to(self.device, non_blocking=True), stack("K"),
                                            stack("w2c_t"), stack("w2c_t1"), stack("flow"))  # [T]
            counts = {n for _, n in items}
            if len(counts) == 1:
                part = values.sum() / counts.pop()
            else:
                part = (values / torch.tensor([float(n) for _, n in items]).to(values)).sum()
            total = part if total is None else total + part
        return self.loss.config.consistency_loss_weight * total

    def step_terms(self) -> dict[str, torch.Tensor]:
        """The per-step terms (regularisers, smoothness) and the consistency term of the targets
        scored with flow (weighted, in the refiner's graph)."""
        o = self.out
        terms = self.loss.step_terms(o.xi, o.delta, o.poses, self.nodes.valid, o.refined, o.gaussians.actor,
                                     self.nodes.sizes)
        if (consistency := self._consistency()) is not None:
            terms["s2_consistency"] = consistency
        return terms

    def finish(self, backward: Optional[Callable[[torch.Tensor], None]],
               stage1_total: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-step terms; with ``backward`` they are back-propagated and the refiner's graph runs
        once (returns them detached), else they are returned in the graph for the caller.

        The run's one host read happens here: finiteness of every stage-2 term and of
        ``stage1_total`` (the step's stage-1 loss, when given; non-finite: ``stage1_finite`` False,
        nothing back-propagated), the term totals and the applied pose correction. Non-finite
        stage-2 terms: the refiner's gradients dropped, {} returned, ``nonfinite`` set."""
        if self.nonfinite:
            self.discard()
            return {}
        names, values = self._stacked(self.step_terms())
        ok = self._finite & torch.isfinite(values.detach()).all()
        stage1_ok = torch.isfinite(stage1_total.detach().float()) if stage1_total is not None else torch.ones_like(ok)
        self._add(names, values.detach())
        trans, rot = self._correction()
        keys = [k for key in self._sums for k in key]
        read = torch.cat([torch.stack([ok.double(), stage1_ok.double(), trans.double(), rot.double()]),
                          *(v.double() for v in self._sums.values())]).tolist()  # the one read
        totals: dict[str, float] = {}
        for k, v in zip(keys, read[4:]):
            totals[k] = totals.get(k, 0.0) + v
        self._read = {"finite": read[0], "stage1_finite": read[1], "trans": read[2], "rot": read[3], **totals}
        self.stage1_finite = bool(read[1])
        if not read[0] or not self.stage1_finite:
            self.discard()
            return {}
        if backward is not None:
            backward(values.sum())
            pairs = [(graph, leaf.grad) for graph, leaf in self._boundary if leaf.grad is not None]
            self._boundary = []
            if pairs:
                torch.autograd.backward([g for g, _ in pairs], [d for _, d in pairs])
            values = values.detach()
        return dict(zip(names, values.unbind()))

    def _correction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ‖v‖ (m) and ‖ω‖ (deg) of the applied correction relative to the boxes as given, over
        refined valid frames (device scalars; masked sums, so nothing is read back)."""
        o = self.out
        mask = (self.nodes.valid & o.refined[:, None]).double()
        xi = se3_log(invert_rigid(self.box_poses.double()) @ o.poses.detach().double())
        n = mask.sum().clamp(min=1)
        trans = (xi[..., 3:].norm(dim=-1) * mask).sum() / n
        rot = (xi[..., :3].norm(dim=-1) * mask).sum() / n * (180 / math.pi)
        return trans, rot

    def discard(self) -> None:
        """Drop the refiner's gradients of this step (non-finite loss)."""
        self.nonfinite = True
        self._boundary = []
        self.refiner.zero_grad(set_to_none=True)

    def report(self) -> Stage2Report:
        elapsed, refine_s = self.timer.stop()
        peak = 0.0
        if self.device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(self.device) - self.start_mem) / 2**20
        if self.nonfinite or self._read is None:
            return Stage2Report("nonfinite", time_s=elapsed)
        plan, read = self.plan, self._read
        refined, ppo = len(plan.rows), plan.points_mean
        extra = sum(self.process_s.values())
        totals = self.totals
        return Stage2Report("ran", sum(totals.values()), refined, ppo, read["trans"], read["rot"], elapsed + extra,
                            refine_s, peak, totals, self.process_s)

    def _add(self, names: tuple[str, ...], values: torch.Tensor) -> None:
        values = values.detach()
        self._sums[names] = self._sums[names] + values if names in self._sums else values
