"""Moving actors as rigid nodes (drivestudio's RigidNodes idea in feed-forward form).

Each moving instance of a segment is a rigid node: anchor points in its **object frame** (box-local:
origin at the box centre, x along the length, y along the width, z up) and its box track (per-frame
object-to-segment pose and validity, ``evolsplat_ns.data.actors``). Nothing is optimised per scene:
the :class:`ActorHead` predicts every actor Gaussian's attributes from the source views, sampling
colour windows with the actor placed at **each source view's own timestamp** (as EVolSplat4D does),
so a car seen at different places in different sources still reads its own pixels.

At a target time the object-frame Gaussians are placed by that time's pose: means ``R x + t`` and
rotations ``q_pose ⊗ q_local`` (a Gaussian's orientation turns with its car), and they are
rasterised in one call with the static and sky Gaussians, so occlusion and depth order are right.
Where a track has no box (or between two frames of which one has none) its actor is not rendered.

Design choice: a separate actor head, not the static heads with an object flag. The static heads
read the sparse volume built over the static points at their fixed positions; an actor moves
through that volume, so its volume feature would describe whatever static structure its box
overlaps at one time. The actor head reads what is true in the object frame: the windows sampled
at each source's own time, the anchor colour and the anchor's object-frame position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import nn

from evolsplat_ns.data.actors import poses_at, track_at
from evolsplat_ns.data.types import PointCloud, Views
from evolsplat_ns.geometry import matrix_to_quat, quat_multiply, quat_to_matrix, rigid_matrix
from evolsplat_ns.model.heads import aggregate_views, aggregated_dim, mlp
from evolsplat_ns.model.node import GaussianParams, knn_mean_distance
from evolsplat_ns.model.projector import Projector
from evolsplat_ns.model.render.sh import num_sh_bases, rgb_to_sh0


@dataclass
class ActorNodes:
    """The moving actors of one segment (plain tensors, never trained directly).

    Attributes:
        means: [N, 3] anchor positions, object frame of their actor (metres).
        features_dc: [N, 3] SH degree-0 anchor colour.
        scales: [N, 3] log scales (mean distance to the 3 nearest points of the same actor).
        actor: [N] long, row of the actor each anchor belongs to.
        frames: [F] long, the segment's frames (the time axis of ``poses``).
        poses: [K, F, 4, 4] object-to-segment box poses (identity where not valid).
        valid: [K, F] bool, the actor has a box at that frame.
        sizes: [K, 3] box (l, w, h).
        ids: the K instance ids (``instances_info.json`` keys), in row order.
        source_frame: [N] long, the scene frame whose box placed each anchor in its object frame
            (None when unknown, e.g. older checkpoints): :meth:`repose` re-places anchors by it.
        origin: where the tracks came from: "box tracks" (the data's instances) or "flow discovery"
            (stage 2's pseudo-boxes, :mod:`evolsplat_ns.model.stage2.discovery`).
    """

    means: torch.Tensor
    features_dc: torch.Tensor
    scales: torch.Tensor
    actor: torch.Tensor
    frames: torch.Tensor
    poses: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor
    ids: tuple[str, ...] = ()
    source_frame: Optional[torch.Tensor] = None
    origin: str = "box tracks"

    @classmethod
    def from_point_cloud(cls, pc: PointCloud, max_points_per_actor: int = 0, min_points: int = 4,
                         origin: str = "box tracks") -> Optional["ActorNodes"]:
        """Actors of ``pc`` (its ``dynamic`` object-frame clouds and ``tracks``, from ``origin``); None if it has none.

        Actors with fewer than ``min_points`` points are left out (no shape to reconstruct).
        """
        ids = [k for k in sorted(pc.dynamic) if k in pc.tracks and pc.dynamic[k][0].shape[0] >= min_points]
        if not ids:
            return None
        means, colors, scales, actor, source = [], [], [], [], []
        has_frames = all(k in pc.dynamic_frames for k in ids)
        for row, k in enumerate(ids):
            pts, rgb = pc.dynamic[k]
            fr = pc.dynamic_frames[k] if has_frames else None
            if 0 < max_points_per_actor < pts.shape[0]:
                keep = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(row))[:max_points_per_actor]
                pts, rgb = pts[keep.to(pts.device)], rgb[keep.to(pts.device)]
                fr = fr[keep.to(fr.device)] if fr is not None else None
            if fr is not None:
                source.append(fr.to(pts.device))
            means.append(pts.float())
            colors.append(rgb.float())
            scales.append(knn_mean_distance(pts.float()).clamp(1e-3, 1.0).log()[:, None].repeat(1, 3))
            actor.append(torch.full((pts.shape[0],), row, dtype=torch.long, device=pts.device))
        tracks = [pc.tracks[k] for k in ids]
        dev = means[0].device
        return cls(torch.cat(means), rgb_to_sh0(torch.cat(colors)), torch.cat(scales), torch.cat(actor),
                   tracks[0].frames.to(dev), torch.stack([t.poses for t in tracks]).to(dev),
                   torch.stack([t.valid for t in tracks]).to(dev), torch.stack([t.size for t in tracks]).to(dev),
                   tuple(ids), torch.cat(source) if has_frames else None, origin)

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def num_actors(self) -> int:
        return self.poses.shape[0]

    def poses_at(self, time: float) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, 4, 4] object-to-segment poses and [K] validity at ``time`` (frame units, fractional ok)."""
        R, pos, _, ok = self.pose_at(time)
        return rigid_matrix(R, pos), ok

    def pose_at(self, time: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotations R [K, 3, 3], positions [K, 3], quaternions [K, 4] (wxyz; all object-to-segment)
        and validity [K] at ``time`` (frame units). At one of the track's frames (every keyframe
        a training sample renders) the stored pose is read directly, with no interpolation."""
        col = self._frame_column(float(time))
        if col is not None:
            return self.poses[:, col, :3, :3], self.poses[:, col, :3, 3], self.box_quats()[:, col], self.valid[:, col]
        q, pos, ok = track_at(self.frames, self.poses, self.valid,
                              torch.tensor([float(time)], device=self.poses.device), self.box_quats())
        return quat_to_matrix(q[0]), pos[0], q[0], ok[0]

    def box_quats(self) -> torch.Tensor:
        """[K, F, 4] wxyz quaternions of the track rotations; cached while the poses are plain
        tensors, or given with them (:meth:`with_poses`). Other poses in a training graph are
        converted on each call, so every target's backward owns its graph."""
        cached = getattr(self, "_box_quats", None)
        if cached is not None and cached[0] is self.poses:
            return cached[1]
        if self.poses.requires_grad:
            return matrix_to_quat(self.poses[..., :3, :3])
        cached = (self.poses, matrix_to_quat(self.poses[..., :3, :3]))
        self._box_quats = cached
        return cached[1]

    def with_poses(self, poses: torch.Tensor, quats: Optional[torch.Tensor] = None) -> "ActorNodes":
        """A copy with the tracks' poses replaced by ``poses`` [K, F, 4, 4] (object-to-segment) and,
        when given, their rotations as wxyz quaternions ``quats`` [K, F, 4] (the caller's own: stage
        2 composes them from the box's and its correction's, with no matrix conversion per target;
        with per-target backward they must be a gradient-boundary leaf like ``poses``). The host
        copy of the frames is shared (no device read per copy)."""
        out = replace(self, poses=poses)
        if quats is not None:
            out._box_quats = (poses, quats)
        for cache in ("_frames_host", "_rows_host"):  # keyed by frames / valid, which the copy shares
            if hasattr(self, cache):
                setattr(out, cache, getattr(self, cache))
        return out

    def _frame_column(self, time: float) -> Optional[int]:
        """Column of ``time`` in ``frames`` when it is one of them exactly, else None (host only)."""
        cached = getattr(self, "_frames_host", None)
        if cached is None or cached[0] is not self.frames:
            cached = (self.frames, {float(f): i for i, f in enumerate(self.frames.tolist())})  # one sync per track set
            self._frames_host = cached
        return cached[1].get(time)

    def anchors_at(self, time: float) -> Optional[torch.Tensor]:
        """Rows [M] (long, on the anchors' device) of the anchors whose actor has a box at ``time``
        (frame units), or None when every actor has one (nothing to drop).

        Boolean masks on a device tensor read their count back to the host (a sync each); at a
        track frame the answer comes from a host copy of ``valid`` and its rows are cached per
        frame column, so a keyframe's targets place their actors without any device read."""
        col = self._frame_column(float(time))
        if col is None:  # interpolated time: validity is computed on the device (one read)
            return self._rows_where(self.pose_at(time)[3])
        cached = getattr(self, "_rows_host", None)
        if cached is None or cached[0] is not self.valid or cached[1] is not self.actor:
            cached = (self.valid, self.actor, self.valid.cpu(), {})  # one sync per track set
            self._rows_host = cached
        valid_host, rows = cached[2], cached[3]
        if col not in rows:
            rows[col] = self._rows_where(valid_host[:, col])
        return rows[col]

    def _rows_where(self, ok: torch.Tensor) -> Optional[torch.Tensor]:
        """Rows [M] of the anchors whose actor is ``ok`` [K] (bool), None when all are."""
        return None if bool(ok.all()) else ok.to(self.actor.device)[self.actor].nonzero()[:, 0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def state_dict(self) -> dict:
        return {**self._tensors(), "ids": list(self.ids), "origin": self.origin}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ActorNodes":
        return cls(**{f.name: state.get(f.name) for f in fields(cls) if f.name not in ("ids", "origin")},
                   ids=tuple(state.get("ids", ())), origin=state.get("origin", "box tracks"))

    def repose(self, poses: torch.Tensor) -> None:
        """Replace the tracks' poses by ``poses`` [K, F, 4, 4] (e.g. stage 2's fitted trajectory),
        re-placing each anchor in its object frame by the pose change of the frame that placed it
        (``T_new(t)⁻¹ · T_old(t)``), so the object-frame shape is the one the new poses imply.
        Without ``source_frame`` only the poses change."""
        if self.source_frame is not None and self.means.shape[0]:
            col = torch.searchsorted(self.frames.to(self.source_frame.device), self.source_frame)
            col = col.clamp(max=self.frames.numel() - 1).to(self.means.device)
            change = torch.linalg.solve(poses.double(), self.poses.double())[self.actor, col]  # [N, 4, 4]
            self.means = ((change[:, :3, :3] @ self.means.double()[:, :, None])[..., 0] + change[:, :3, 3]).to(self.means.dtype)
            self.scales = torch.cat([knn_mean_distance(self.means[self.actor == k]).clamp(1e-3, 1.0).log()[:, None]
                                     for k in range(self.num_actors)]).repeat(1, 3)[_inverse_order(self.actor)]
        self.poses = poses.to(self.poses.dtype)

    def to(self, device: torch.device | str) -> "ActorNodes":
        for name, tensor in self._tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def gaussians_of(self, gaussians: "ActorGaussians", row: int) -> GaussianParams:
        """Actor ``row``'s Gaussians in its object frame (export)."""
        keep = gaussians.actor == row
        return GaussianParams(means=gaussians.means[keep], quats=gaussians.quats[keep], scales=gaussians.scales[keep],
                              opacities=gaussians.opacities[keep], sh=gaussians.sh[keep])


def _inverse_order(actor: torch.Tensor) -> torch.Tensor:
    """Indices that put rows grouped by actor (0, 1, ...) back into the order of ``actor`` [N]."""
    order = torch.argsort(actor, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


@dataclass
class ActorGaussians:
    """Actor Gaussians in their object frames, predicted once per step (shared by every target).

    Attributes: means [N, 3], quats [N, 4] (wxyz, object frame), scales [N, 3] (linear), opacities
    [N], sh [N, bases, 3], actor [N] long (row into the node's tracks).
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor
    actor: torch.Tensor


class ActorHead(nn.Module):
    """All attributes of actor Gaussians from source windows (each at its own timestamp), the
    anchor colour and the anchor's object-frame position. Starts as the point cloud: zero colour
    residual, node scale, identity rotation, opacity sigmoid(bias)."""

    def __init__(self, window_size: int, sh_degree: int = 1, hidden: int = 64, max_log_residual: float = 3.0) -> None:
        super().__init__()
        self.num_bases = num_sh_bases(sh_degree)
        self.max_log_residual = max_log_residual
        self.net = mlp(aggregated_dim(window_size) + 3, hidden, 3 * self.num_bases + 3 + 4 + 1)
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            last.bias[3 * self.num_bases + 3] = 1.0  # quaternion w: identity rotation at init
            last.bias[-1] = 2.0  # opacity sigmoid(2) ~ 0.88: a car body is opaque

    def forward(self, image_feat: torch.Tensor, nodes: ActorNodes) -> ActorGaussians:
        """[N, A] aggregated windows -> the actors' Gaussians (object frames)."""
        out = self.net(torch.cat([image_feat, nodes.means], dim=-1))
        b = 3 * self.num_bases
        sh = out[:, :b].reshape(-1, self.num_bases, 3)
        sh = torch.cat([sh[:, :1] + nodes.features_dc[:, None], sh[:, 1:]], dim=1)
        log_residual = self.max_log_residual * torch.tanh(out[:, b:b + 3] / self.max_log_residual)
        quats = out[:, b + 3:b + 7]
        quats = quats / quats.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return ActorGaussians(nodes.means, quats, (nodes.scales + log_residual).exp(), torch.sigmoid(out[:, -1]),
                              sh, nodes.actor)


def sample_actor_windows(projector: Projector, nodes: ActorNodes, source: Views, occlusion_tau: float) -> torch.Tensor:
    """[N, A] aggregated colour windows of the actors' anchors over ``source`` views, each actor
    placed at each view's own frame (a view where its actor has no box does not count). All views
    are projected in one batch: the projector takes per-view positions [V, N, 3]."""
    poses, ok = poses_at(nodes.frames, nodes.poses, nodes.valid, source.frame_ids.to(nodes.poses.device),
                         nodes.box_quats())
    T = poses[:, nodes.actor]  # [V, N, 4, 4] object-to-segment of each anchor's actor at each view's time
    positions = (T[..., :3, :3] @ nodes.means[None, :, :, None])[..., 0] + T[..., :3, 3]
    proj = projector.sample(positions, source)
    valid = proj.valid & ok[:, nodes.actor].T
    return aggregate_views(proj.colors, proj.occlusion, valid, occlusion_tau)


def place_actors(gaussians: ActorGaussians, nodes: ActorNodes, time: float) -> GaussianParams:
    """The actors' Gaussians posed in the segment frame at ``time``; actors without a box then are
    left out. Means ``R x + t``, rotations ``q_pose ⊗ q``."""
    R, pos, box_quats, ok = nodes.pose_at(time)
    R, pos, box_quats = R.to(gaussians.means.dtype), pos.to(gaussians.means.dtype), box_quats.to(gaussians.means.dtype)
    # The nodes' cached rows hold for Gaussians predicted per anchor (the head's); others are masked here.
    rows = nodes.anchors_at(time) if gaussians.actor is nodes.actor else ok[gaussians.actor].nonzero()[:, 0]
    g = gaussians if rows is None else ActorGaussians(*(t.index_select(0, rows) for t in (
        gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.sh, gaussians.actor)))
    means = (R[g.actor] @ g.means[:, :, None])[..., 0] + pos[g.actor]
    return GaussianParams(means=means, quats=quat_multiply(box_quats[g.actor], g.quats), scales=g.scales,
                          opacities=g.opacities, sh=g.sh)
