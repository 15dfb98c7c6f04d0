"""``OnlineDynamicProcessor``: per segment, the moving objects' masks and observed rigid motion.

Runs online (inside training, no preprocessing files), once per segment; its result
(:class:`ObservedMotion`, a few numbers per object and frame) is cached on the segment's state in
the :class:`~evolsplat_ns.model.segment_store.SegmentStore` (LRU-bounded, spilled and checkpointed
with the segment), so a segment is processed once however often it is trained.

For a segment with box tracks (:class:`~evolsplat_ns.model.actors.ActorNodes`: objects and
identities come from the tracks; for a segment without, from stage 2's flow discovery,
:mod:`evolsplat_ns.model.stage2.discovery`, whose pseudo-box tracks are treated exactly like box
tracks here):

1. **Masks** (segmentation): every pixel with depth is lifted into the segment frame and assigned
   to the box it lies in, enlarged by ``mask_box_margin`` (so a noisy box still covers its car) and
   above ``mask_ground_clearance`` over the box floor (the road under a car is not the car); the
   nearest box wins overlaps. With ``segmenter = "sam2_box"`` and a real SAM2 checkpoint the
   projected boxes prompt SAM2 and its confident masks replace these; an untrusted SAM2 never does.
2. **Flow**: the dataset's ``flow/`` (a real observation: trusted) when present, else torchvision
   RAFT, trusted only with real weights (``optical_flow_weights``); untrusted flow is not used.
3. **Aggregation**: for each object and consecutive frame pair, flow + depth correspondences of
   every camera (:func:`~evolsplat_ns.model.stage2.aggregate.flow_correspondences`) give its rigid
   motion by a robust weighted Kabsch fit (:func:`~evolsplat_ns.model.stage2.aggregate.robust_rigid_fit`);
   weak evidence (< ``min_correspondences`` points, or points on a line) gives no increment.
4. **Trajectory fit**: the noisy boxes are absolute observations of each frame's pose, the flow
   increments relative observations between frames, and (``motion_prior_sigma_m`` / ``_deg`` > 0)
   a constant-velocity prior on consecutive frames; a weighted least-squares fit of the box centre
   (3) and heading (yaw about the segment's z) per frame (:func:`fit_trajectory`, box noise
   estimated from the residuals) averages independent box noise over the frames tied together.
   Where a frame is tied to no other its box is kept exactly. Roll and pitch stay the box's
   (driving boxes are heading-only).

``status()["objects_from"]``: "box tracks", "flow discovery" (with ``objects_discovered``), or
"none (why)" for a segment without objects (no box tracks and no flow/depth to discover from, or
discovery found nothing, or ``discover_without_boxes`` off).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from evolsplat_ns.data.observations import PairObservation, SegmentObservations, ViewObservation
from evolsplat_ns.model.actors import ActorNodes
from evolsplat_ns.model.stage2.aggregate import box_increment, flow_correspondences, lift, robust_rigid_fit
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.se3 import se3_log

BOX_SIGMA_FLOOR = (0.02, math.radians(0.1))
"""Smallest box noise (m, rad) the variance estimate may reach (near-perfect boxes stay boxes)."""


@dataclass
class ObservedMotion:
    """What the processor observed for one segment's K actors over its F frames (segment frame).

    Attributes:
        poses: [K, F, 4, 4] fitted object-to-segment poses (the box itself where no evidence).
        box_poses: [K, F, 4, 4] the boxes as the data gave them.
        xi: [K, F, 6] ``se3_log(T_box⁻¹ · T_fit)``: the observed correction in object axes.
        weight: [K, F] 1 where flow evidence tied the frame to others, else 0.
        increments_ok: [K, F-1] bool, an increment t -> t+1 was fitted from flow + depth.
        inliers: [K, F-1] inlier fraction of each fitted increment (0 where none).
        box_sigma: [K, 2] estimated box noise (translation m, yaw rad) per object.
        times: seconds spent in segmentation / flow / aggregation.
        flow_source: where the flow came from ("dataset", "raft", or "none (why)").
    """

    poses: torch.Tensor
    box_poses: torch.Tensor
    xi: torch.Tensor
    weight: torch.Tensor
    increments_ok: torch.Tensor
    inliers: torch.Tensor
    box_sigma: torch.Tensor
    times: dict[str, float] = field(default_factory=dict)
    flow_source: str = "none"

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ObservedMotion":
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def to(self, device: torch.device | str) -> "ObservedMotion":
        for f in fields(self):
            if isinstance(v := getattr(self, f.name), torch.Tensor):
                setattr(self, f.name, v.to(device))
        return self

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for f in fields(self)
                   if isinstance(v := getattr(self, f.name), torch.Tensor))


# -- masks -----------------------------------------------------------------------------------------


def box_label_map(view: ViewObservation, poses: torch.Tensor, sizes: torch.Tensor, margin: float,
                  clearance: float) -> torch.Tensor:
    """[H, W] long: row of the box (``poses`` [K, 4, 4] object-to-segment, ``sizes`` [K, 3]) whose
    enlarged volume holds the pixel's depth-lifted point, -1 for none (or no depth)."""
    H, W = view.depth.shape
    labels = torch.full((H, W), -1, dtype=torch.long, device=view.depth.device)
    has = view.depth > 0
    poses, sizes = poses.to(view.depth.device), sizes.to(view.depth.device)
    if poses.shape[0] == 0 or not bool(has.any()):
        return labels
    rows, cols = has.nonzero(as_tuple=True)
    uv = torch.stack([cols, rows], -1).double() + 0.5
    X = lift(uv, view.depth[rows, cols].double(), view.K.double(), view.c2w.double())
    inv = torch.linalg.inv(poses.double())
    local = torch.einsum("kij,nj->kni", inv[:, :3, :3], X) + inv[:, None, :3, 3]  # [K, n, 3] box frames
    half = 0.5 * sizes.double()[:, None]
    inside = (local[..., :2].abs() <= half[..., :2] + margin).all(-1)
    inside &= (local[..., 2] > -half[..., 2] + clearance) & (local[..., 2] < half[..., 2] + margin)
    dist = (local / half.clamp(min=1e-3)).norm(dim=-1).masked_fill(~inside, float("inf"))
    best = dist.min(0)
    labels[rows, cols] = torch.where(torch.isfinite(best.values), best.indices, torch.full_like(best.indices, -1))
    return labels


def projected_box_xyxy(view: ViewObservation, pose: torch.Tensor, size: torch.Tensor, margin: float) -> Optional[torch.Tensor]:
    """[4] pixel xyxy of the enlarged box's projected corners (clipped to the image), None if behind."""
    signs = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=torch.float64)
    corners = signs * (0.5 * size.double() + margin)
    world = corners @ pose.double()[:3, :3].T + pose.double()[:3, 3]
    w2c = torch.linalg.inv(view.c2w.double())
    cam = world @ w2c[:3, :3].T + w2c[:3, 3]
    if bool((cam[:, 2] <= 0.1).any()):
        return None
    pix = cam @ view.K.double().T
    uv = pix[:, :2] / pix[:, 2:]
    H, W = view.depth.shape
    lo, hi = uv.min(0).values, uv.max(0).values
    box = torch.stack([lo[0].clamp(min=0), lo[1].clamp(min=0), hi[0].clamp(max=W), hi[1].clamp(max=H)])
    return box if bool(box[2] > box[0]) and bool(box[3] > box[1]) else None


# -- trajectory fit --------------------------------------------------------------------------------


def _yaw(R: torch.Tensor) -> torch.Tensor:
    return torch.atan2(R[..., 1, 0], R[..., 0, 0])


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.atan2(torch.sin(a), torch.cos(a))


def _rot_z(a: torch.Tensor) -> torch.Tensor:
    c, s, o, i = torch.cos(a), torch.sin(a), torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([c, -s, o, s, c, o, o, o, i], -1).reshape(*a.shape, 3, 3)


class _Rows:
    """Rows of a weighted linear least-squares problem over ``n`` unknowns of ``dim`` each."""

    def __init__(self, n: int, dim: int) -> None:
        self.n, self.dim = n, dim
        self.rows: list[tuple[dict[int, torch.Tensor], torch.Tensor, float, str]] = []

    def add(self, coef: dict[int, torch.Tensor], rhs: torch.Tensor, sigma: float, kind: str) -> None:
        """``Σ_j coef[j] @ x_j = rhs`` ([dim, dim] coefficients, [dim] rhs) with noise ``sigma``."""
        self.rows.append((coef, rhs, 1.0 / sigma, kind))

    def solve(self, sigmas: dict[str, float]) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """x [n, dim], and per row kind (sum of squared residuals, redundancy) for variance
        estimation; ``sigmas`` overrides the noise of a row kind."""
        d, m = self.dim, len(self.rows)
        A = torch.zeros(m * d, self.n * d, dtype=torch.float64)
        b = torch.zeros(m * d, dtype=torch.float64)
        for r, (coef, rhs, inv_sigma, kind) in enumerate(self.rows):
            s = 1.0 / sigmas[kind] if kind in sigmas else inv_sigma
            for j, M in coef.items():
                A[r * d:(r + 1) * d, j * d:(j + 1) * d] = s * M
            b[r * d:(r + 1) * d] = s * rhs
        Q, R = torch.linalg.qr(A)
        x = torch.linalg.solve_triangular(R, (Q.T @ b)[:, None], upper=True)[:, 0]
        residual, leverage = A @ x - b, Q.pow(2).sum(1)  # leverage: diagonal of the hat matrix
        stats: dict[str, tuple[float, float]] = {}
        for r, (_, _, inv_sigma, kind) in enumerate(self.rows):
            s = 1.0 / sigmas[kind] if kind in sigmas else inv_sigma
            rss, red = stats.get(kind, (0.0, 0.0))
            sl = slice(r * d, (r + 1) * d)
            stats[kind] = (rss + float(residual[sl].pow(2).sum()) / s ** 2, red + float((1 - leverage[sl]).sum()))
        return x.reshape(self.n, d), stats


def fit_trajectory(box: torch.Tensor, valid: torch.Tensor, increments: torch.Tensor, ok: torch.Tensor,
                   increment_sigma: tuple[float, float], prior_sigma: tuple[float, float] = (0.0, 0.0),
                   rounds: int = 3, consecutive: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit per-frame poses to noisy boxes (absolute) and flow increments (relative).

    Args:
        box: [F, 4, 4] object-to-segment box poses (consecutive scene frames); valid: [F] bool.
        increments: [F-1, 4, 4] segment-frame motion t -> t+1 (``X_t1 = D · X_t``); ok: [F-1] bool
            where one was fitted (only between two valid frames).
        increment_sigma: (m, rad) noise of a fitted increment's translation and yaw.
        prior_sigma: (m, rad) per frame² of a constant-velocity motion prior on the centre and the
            heading (second differences ≈ 0); 0 = no prior.
        rounds: the box noise (translation, yaw) is re-estimated from the residuals this many times
            (variance components with the hat-matrix redundancy), starting from 0.3 m / 3 deg.
        consecutive: [F-1] bool, columns f and f+1 are consecutive scene frames (None: all are);
            the prior only spans consecutive frames (a held-out frame breaks it).
    Returns:
        poses [F, 4, 4] (the box exactly where a frame is tied to no other), tied [F] bool, the
        estimated box noise [2] (m, rad).

    Unknowns per tied frame: centre c (3) and a yaw correction e about the segment z (the fitted
    rotation is ``Rz(e) · R_box``). Rows: ``c_t = c_box,t`` (σ_box), ``c_t+1 − R_D c_t = t_D``
    (σ_inc), ``e_t = 0`` (σ_yaw,box), ``e_t+1 − e_t = yaw(D) − (ψ_box,t+1 − ψ_box,t)`` (σ_yaw,inc),
    and with a prior ``c_t−1 − 2 c_t + c_t+1 = 0``, likewise for the heading ψ = ψ_box + e.
    """
    box = box.double()
    F = box.shape[0]
    ok = ok & valid[:-1] & valid[1:]
    step = consecutive if consecutive is not None else torch.ones(max(F - 1, 0), dtype=torch.bool)
    triples = (valid[:-2] & valid[1:-1] & valid[2:] & step[:-1] & step[1:] if F >= 3
               else torch.zeros(0, dtype=torch.bool))
    use_prior = prior_sigma[0] > 0 and prior_sigma[1] > 0
    tied = torch.zeros(F, dtype=torch.bool)
    tied[:-1] |= ok
    tied[1:] |= ok
    if use_prior:
        for f in triples.nonzero()[:, 0].tolist():
            tied[f:f + 3] = True
    out = box.clone()
    sigma = torch.tensor([0.3, math.radians(3.0)], dtype=torch.float64)
    if not bool(tied.any()):
        return out.float(), tied, sigma
    idx = {int(f): j for j, f in enumerate(tied.nonzero()[:, 0].tolist())}
    c_box, psi_box = box[:, :3, 3], _yaw(box[:, :3, :3])
    D = increments.double()
    eye, one = torch.eye(3, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    rows_c, rows_e = _Rows(len(idx), 3), _Rows(len(idx), 1)
    for f, j in idx.items():
        rows_c.add({j: eye}, c_box[f], 1.0, "box")
        rows_e.add({j: one}, torch.zeros(1, dtype=torch.float64), 1.0, "box")
    for f in ok.nonzero()[:, 0].tolist():
        rows_c.add({idx[f + 1]: eye, idx[f]: -D[f, :3, :3]}, D[f, :3, 3], increment_sigma[0], "flow")
        dpsi = _wrap(_yaw(D[f, :3, :3]) - (psi_box[f + 1] - psi_box[f]))
        rows_e.add({idx[f + 1]: one, idx[f]: -one}, dpsi[None], increment_sigma[1], "flow")
    if use_prior:
        for f in triples.nonzero()[:, 0].tolist():
            a, m, b = idx[f], idx[f + 1], idx[f + 2]
            rows_c.add({a: eye, m: -2 * eye, b: eye}, torch.zeros(3, dtype=torch.float64), prior_sigma[0], "prior")
            curvature = _wrap(psi_box[f + 2] - psi_box[f + 1]) - _wrap(psi_box[f + 1] - psi_box[f])
            rows_e.add({a: one, m: -2 * one, b: one}, -curvature[None], prior_sigma[1], "prior")
    for _ in range(rounds):
        c, stats_c = rows_c.solve({"box": float(sigma[0])})
        e, stats_e = rows_e.solve({"box": float(sigma[1])})
        estimate = [math.sqrt(st["box"][0] / max(st["box"][1], 1e-6)) for st in (stats_c, stats_e)]
        sigma = torch.tensor([max(estimate[0], BOX_SIGMA_FLOOR[0]), max(estimate[1], BOX_SIGMA_FLOOR[1])],
                             dtype=torch.float64)
    for f, j in idx.items():
        out[f, :3, :3] = _rot_z(e[j, 0]) @ box[f, :3, :3]
        out[f, :3, 3] = c[j]
    return out.float(), tied, sigma


# -- the processor ---------------------------------------------------------------------------------


class OnlineDynamicProcessor:
    """Masks, flow and observed motion of a segment's moving objects (see the module docstring).

    Args:
        config: the stage-2 settings (mask, flow, aggregation and SAM2/RAFT keys). Masks, fits,
            RAFT and SAM2 run on the device of the actors being processed.
        flow_model: the flow estimator for data without ``flow/`` (RaftFlow's interface:
            ``trusted``, ``(image0, image1) -> [H, W, 2]``); None: RAFT from the config, built on
            first use. The same model serves flow discovery (:meth:`flow_model`).
    """

    def __init__(self, config: Stage2Config, flow_model=None) -> None:
        self.config = config
        self._raft = flow_model
        self._sam2 = None
        self.flow_trusted = False
        self.segmenter_trusted = False
        self.flow_source = "not run yet"
        self.objects_from = "not run yet"
        """Where the last processed segment's objects came from: "box tracks", "flow discovery", or
        "none (why)" (set by :meth:`process` from the actors, by the model for a segment without)."""
        self.objects_discovered = 0
        """Objects flow discovery found on the last segment it ran on (0 with box tracks)."""
        self._device = torch.device("cpu")

    # -- components, built on first use (RAFT/SAM2 only when the data needs them) ------------------

    def _segmenter(self):
        if self.config.segmenter != "sam2_box":
            return None
        if self._sam2 is None:
            from evolsplat_ns.model.stage2.perception import Sam2BoxSegmenter, Sam2Config

            c = self.config
            self._sam2 = Sam2BoxSegmenter(Sam2Config(c.sam2_model_cfg, c.sam2_checkpoint, c.confidence_threshold,
                                                     c.min_mask_area), self._device)
            self.segmenter_trusted = self._sam2.trusted
        return self._sam2

    def flow_model(self, device: Optional[torch.device | str] = None):
        """The flow model for data without ``flow/`` (trusted only with real weights), built on first
        use on ``device`` (default: where the last segment was processed). Flow discovery asks for
        it too (:func:`~evolsplat_ns.model.stage2.discovery.discover_objects` refuses it untrusted)."""
        if self._raft is None:
            from evolsplat_ns.model.stage2.perception import RaftConfig, RaftFlow

            if device is not None:
                self._device = torch.device(device)
            c = self.config
            self._raft = RaftFlow(RaftConfig(c.optical_flow_model, c.optical_flow_weights), self._device)
        return self._raft

    def _flow_plan(self, obs: SegmentObservations) -> tuple[str, bool]:
        """(flow source, usable) for this segment."""
        if not self.config.use_optical_flow_aggregation:
            return "none (use_optical_flow_aggregation off)", False
        if not obs.has_depth:
            return "none (the data has no depth/ to lift flow into 3D)", False
        if obs.has_flow:
            return "dataset", True
        raft = self.flow_model()
        if not raft.trusted:
            return f"none ({self.config.optical_flow_model} without optical_flow_weights is untrusted)", False
        return self.config.optical_flow_model, True

    def status(self) -> dict:
        return {"flow_trusted": self.flow_trusted, "flow_source": self.flow_source,
                "segmenter": self.config.segmenter, "segmenter_trusted": self.segmenter_trusted,
                "objects_from": self.objects_from, "objects_discovered": self.objects_discovered}

    # -- one segment -----------------------------------------------------------------------------

    def process(self, nodes: ActorNodes, obs: Optional[SegmentObservations]) -> ObservedMotion:
        """Observed motion of ``nodes``' actors over their frames from ``obs`` (None: no data)."""
        K, F = nodes.valid.shape
        box = nodes.poses.detach().cpu().double()
        valid = nodes.valid.detach().cpu()
        increments = box_increment_all(box)
        ok = torch.zeros(K, max(F - 1, 0), dtype=torch.bool)
        inliers = torch.zeros(K, max(F - 1, 0), dtype=torch.float64)
        times = {"segmentation": 0.0, "flow": 0.0, "aggregation": 0.0}
        source, usable = self._flow_plan(obs) if obs is not None else ("none (no observations for this segment)", False)
        self.flow_source, self.flow_trusted = source, usable
        self.objects_from = nodes.origin
        self.objects_discovered = K if nodes.origin == "flow discovery" else 0
        self._device = nodes.poses.device  # masks and fits run where the model runs
        if usable:
            frames = nodes.frames.tolist()
            col = {int(t): i for i, t in enumerate(frames)}
            for t, t1 in obs.pairs():
                if t not in col or t1 not in col:
                    continue
                i = col[t]
                rows = [k for k in range(K) if bool(valid[k, i]) and bool(valid[k, i + 1])]
                if rows:
                    self._pair(obs, t, i, rows, box, nodes.sizes.detach().cpu(), increments, ok, inliers, times)
        poses, weight, sigma = box.clone().float(), torch.zeros(K, F), torch.zeros(K, 2, dtype=torch.float64)
        start = time.perf_counter()
        frames_t = nodes.frames.detach().cpu()
        consecutive = frames_t[1:] - frames_t[:-1] == 1
        for k in range(K):
            poses[k], tied, sigma[k] = fit_trajectory(box[k], valid[k], increments[k], ok[k], self._increment_sigma(),
                                                      self._prior_sigma(), consecutive=consecutive)
            weight[k] = tied.float()
        xi = se3_log(torch.linalg.solve(box, poses.double())).float() * weight[..., None]
        times["aggregation"] += time.perf_counter() - start
        dev = nodes.poses.device
        return ObservedMotion(poses.to(dev), nodes.poses.detach().clone(), xi.to(dev), weight.to(dev), ok.to(dev), inliers.float().to(dev),
                              sigma.float().to(dev), times, source)

    def _prior_sigma(self) -> tuple[float, float]:
        c = self.config
        return c.motion_prior_sigma_m, math.radians(c.motion_prior_sigma_deg)

    def _increment_sigma(self) -> tuple[float, float]:
        c = self.config
        return c.flow_increment_sigma_m, math.radians(c.flow_increment_sigma_deg)

    def _pair(self, obs: SegmentObservations, t: int, i: int, rows: list[int], box: torch.Tensor, sizes: torch.Tensor,
              increments: torch.Tensor, ok: torch.Tensor, inliers: torch.Tensor, times: dict[str, float]) -> None:
        """Fit the increments t -> t+1 of objects ``rows`` from every camera's flow + depth."""
        c = self.config
        X = {k: [] for k in rows}
        Y = {k: [] for k in rows}
        seg = self._segmenter()
        for cam in obs.cameras:
            start = time.perf_counter()
            pair = _pair_on(obs.pair(t, cam, images=seg is not None or not obs.has_flow), self._device)
            flow = pair.flow if pair.flow is not None else self.flow_model()(pair.view_t.image, pair.view_t1.image)
            times["flow"] += time.perf_counter() - start
            start = time.perf_counter()
            lab_t = self._labels(pair.view_t, box[rows, i], sizes[rows], seg)
            lab_t1 = self._labels(pair.view_t1, box[rows, i + 1], sizes[rows], seg)
            times["segmentation"] += time.perf_counter() - start
            start = time.perf_counter()
            for j, k in enumerate(rows):
                m0, m1 = lab_t == j, lab_t1 == j
                if not bool(m0.any()) or not bool(m1.any()):
                    continue
                a, b = flow_correspondences(m0, m1, flow.double(), pair.view_t.depth, pair.view_t1.depth, pair.view_t.K,
                                            pair.view_t.c2w, pair.view_t1.c2w)
                X[k].append(a)
                Y[k].append(b)
            times["aggregation"] += time.perf_counter() - start
        start = time.perf_counter()
        for k in rows:
            if not X[k]:
                continue
            fit = robust_rigid_fit(torch.cat(X[k]), torch.cat(Y[k]), increments[k, i].to(self._device),
                                   min_points=c.min_correspondences)
            if fit.ok:
                increments[k, i], ok[k, i], inliers[k, i] = fit.transform.double().cpu(), True, fit.inlier_fraction
        times["aggregation"] += time.perf_counter() - start

    def _labels(self, view: ViewObservation, poses: torch.Tensor, sizes: torch.Tensor, seg) -> torch.Tensor:
        c = self.config
        labels = box_label_map(view, poses, sizes, c.mask_box_margin, c.mask_ground_clearance)
        if seg is None or not seg.trusted or view.image is None:
            return labels  # untrusted SAM2 never replaces the box masks
        boxes, keep = [], []
        for j in range(poses.shape[0]):
            xyxy = projected_box_xyxy(view, poses[j], sizes[j], c.mask_box_margin)
            if xyxy is not None:
                boxes.append(xyxy.float())
                keep.append(j)
        if not boxes:
            return labels
        box_masks = torch.stack([labels == j for j in keep])
        masks = seg.supervision_masks(view.image, torch.stack(boxes), box_masks).to(labels.device) & (view.depth > 0)
        out = torch.full_like(labels, -1)
        for m, j in zip(masks, keep):
            out[m & (out < 0)] = j
        return out


def _pair_on(pair: PairObservation, device: torch.device) -> PairObservation:
    def view(v: ViewObservation) -> ViewObservation:
        move = lambda x: x.to(device) if x is not None else None  # noqa: E731
        return ViewObservation(v.frame, v.cam, move(v.K), move(v.c2w), move(v.depth), move(v.image))

    return PairObservation(view(pair.view_t), view(pair.view_t1),
                           pair.flow.to(device) if pair.flow is not None else None)


def box_increment_all(box: torch.Tensor) -> torch.Tensor:
    """[K, F-1, 4, 4] box increments t -> t+1 of ``box`` [K, F, 4, 4] (the fallback motion)."""
    if box.shape[1] < 2:
        return box.new_zeros(box.shape[0], 0, 4, 4)
    return box_increment(box[:, :-1], box[:, 1:])

