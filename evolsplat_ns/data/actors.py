"""Box tracks of moving actors in a segment: per-frame object-to-segment poses and validity.

drivestudio's ``instances/instances_info.json`` gives each instance, per annotated frame, its box
pose ``obj_to_world`` and ``box_size`` = [l, w, h]. A track turns those into the segment frame
(vehicle frame at the segment's first frame) over the segment's frames. The object frame is the
box-local frame: origin at the box centre, x along the length (heading), y along the width, z up.

Validity: a track is valid at a segment frame where its instance has a box; at a fractional time
between two consecutive valid frames the pose is interpolated (slerp + linear position); anywhere
else (outside the track, or next to a frame without a box) the actor is not rendered.

Splitting (:func:`split_by_tracks`): the one rule that moves points of moving actors out of a
segment's background cloud into their object frames, used both by the point-cloud generators (box
tracks from ``instances_info.json``) and by stage 2's flow discovery (pseudo-box tracks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from evolsplat_ns.data.types import PointCloud
from evolsplat_ns.geometry import invert_rigid, matrix_to_quat, quat_to_matrix, rigid_matrix, slerp


@dataclass
class ActorTrack:
    """One moving instance's box track over a segment.

    Attributes:
        instance_id: the instance's id in ``instances_info.json``.
        size: [3] box (l, w, h), metres.
        frames: [F] long, the segment's frames (scene frame indices, ascending).
        poses: [F, 4, 4] float32 object(box-local)-to-segment; identity where not valid.
        valid: [F] bool, the instance has a box at that frame.
    """

    instance_id: str
    size: torch.Tensor
    frames: torch.Tensor
    poses: torch.Tensor
    valid: torch.Tensor


def track_from_boxes(instance_id: str, boxes: dict[int, tuple], frames: Sequence[int],
                     seg_from_world: torch.Tensor) -> ActorTrack:
    """A track over ``frames`` from ``boxes`` (frame -> (obj_to_world [4, 4], size [3])), posed in
    the segment frame by ``seg_from_world`` [4, 4] (float64)."""
    poses = torch.eye(4, dtype=torch.float64).repeat(len(frames), 1, 1)
    valid = torch.zeros(len(frames), dtype=torch.bool)
    sizes = []
    for i, t in enumerate(frames):
        if t in boxes:
            obj_to_world, size = boxes[t]
            poses[i] = seg_from_world @ torch.as_tensor(obj_to_world, dtype=torch.float64)
            valid[i] = True
            sizes.append(torch.as_tensor(size, dtype=torch.float64))
    size = torch.stack(sizes).mean(0) if sizes else torch.zeros(3, dtype=torch.float64)
    return ActorTrack(str(instance_id), size.float(), torch.as_tensor(list(frames), dtype=torch.long),
                      poses.float(), valid)


def track_at(frames: torch.Tensor, poses: torch.Tensor, valid: torch.Tensor, times: torch.Tensor,
             quats: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotations and positions of K tracks at ``times`` (scene frame units, fractional allowed).

    Args:
        frames: [F] long ascending segment frames; poses: [K, F, 4, 4] object-to-segment;
            valid: [K, F] bool; times: [T] float; quats: [K, F, 4] the rotations of ``poses`` as
            wxyz quaternions if the caller has them (saves converting every call).
    Returns:
        quats [T, K, 4] (wxyz, object-to-segment), positions [T, K, 3] (segment frame) and valid
        [T, K]: at an exact frame that frame's pose; strictly between two consecutive frames, both
        valid, the interpolation (slerp + linear position); otherwise invalid.
    """
    f = frames.to(times.device, torch.float64)
    t = times.to(torch.float64).clamp(f[0], f[-1])
    hi = torch.searchsorted(f, t).clamp(1, len(f) - 1) if len(f) > 1 else torch.zeros_like(t, dtype=torch.long)
    lo = (hi - 1).clamp(min=0)
    exact_hi = f[hi] == t
    lo = torch.where(exact_hi, hi, lo)
    w = torch.where(hi == lo, torch.zeros_like(t), (t - f[lo]) / (f[hi] - f[lo]).clamp(min=1e-9))
    inside = (times.to(torch.float64) >= f[0]) & (times.to(torch.float64) <= f[-1])
    quats = matrix_to_quat(poses[..., :3, :3]) if quats is None else quats
    w = w.to(poses.dtype)[:, None].expand(-1, poses.shape[0])  # [T, K]
    q = slerp(quats[:, lo].transpose(0, 1), quats[:, hi].transpose(0, 1), w)
    pos = torch.lerp(poses[:, lo, :3, 3].transpose(0, 1), poses[:, hi, :3, 3].transpose(0, 1), w[..., None])
    ok = valid[:, lo].T & valid[:, hi].T & inside[:, None]
    return q, pos, ok


def poses_at(frames: torch.Tensor, poses: torch.Tensor, valid: torch.Tensor, times: torch.Tensor,
             quats: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses [T, K, 4, 4] (object-to-segment) and valid [T, K] of K tracks at ``times``; the
    arguments and the interpolation are :func:`track_at`'s."""
    q, pos, ok = track_at(frames, poses, valid, times, quats)
    return rigid_matrix(quat_to_matrix(q), pos), ok


@dataclass
class TrackSplit:
    """What :func:`split_by_tracks` did to N points.

    Attributes:
        background: [N] bool, the points no track claimed.
        dynamic: track id -> (points [M, 3] in its object (box-local) frame, colours [M, 3]).
        dynamic_frames: track id -> [M] long, the scene frame whose box placed each of them.
    """

    background: torch.Tensor
    dynamic: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dynamic_frames: dict[str, torch.Tensor]


def split_by_tracks(points: torch.Tensor, colors: torch.Tensor, frame_ids: torch.Tensor,
                    tracks: dict[str, ActorTrack], margin: float, clearance: float) -> TrackSplit:
    """Move the points inside the tracks' boxes into their object frames.

    A point seen at frame t (``frame_ids``) belongs to the first track (in ``tracks``' order) with a
    box at t whose volume holds it: in that box's frame within ``margin`` (m) of its sides and top
    and more than ``clearance`` (m) above its floor (the road under a car stays background). The
    box is the track's one ``size``.

    Args:
        points: [N, 3] segment frame; colors: [N, 3]; frame_ids: [N] long scene frames.
        tracks: id -> :class:`ActorTrack` (object-to-segment poses over its ``frames``).
    Returns:
        a :class:`TrackSplit`; only tracks that claimed at least one point appear in ``dynamic``.
    """
    background = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
    dynamic: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    dynamic_frames: dict[str, torch.Tensor] = {}
    for track_id, track in tracks.items():
        half = track.size.to(points.device, points.dtype) / 2
        local_all, rgb_all, frame_all = [], [], []
        for i in track.valid.nonzero()[:, 0].tolist():
            t = int(track.frames[i])
            sel = ((frame_ids == t) & background).nonzero()[:, 0]
            if sel.numel() == 0:
                continue
            T = invert_rigid(track.poses[i].to(points.device, points.dtype))
            local = points[sel] @ T[:3, :3].T + T[:3, 3]
            inside = (local.abs() <= half + margin).all(-1) & (local[:, 2] > -half[2] + clearance)
            idx = sel[inside]
            background[idx] = False
            local_all.append(local[inside])
            rgb_all.append(colors[idx])
            frame_all.append(torch.full((idx.numel(),), t, dtype=torch.long, device=points.device))
        if local_all and sum(x.shape[0] for x in local_all):
            dynamic[track_id] = (torch.cat(local_all).float(), torch.cat(rgb_all).float())
            dynamic_frames[track_id] = torch.cat(frame_all)
    return TrackSplit(background, dynamic, dynamic_frames)


def split_point_cloud(pc: PointCloud, tracks: dict[str, ActorTrack], margin: float, clearance: float) -> PointCloud:
    """``pc`` with the background points inside ``tracks``' boxes moved to actors (its ``dynamic``,
    ``tracks`` and ``dynamic_frames``; existing actors are kept). Needs ``pc.frame_ids``."""
    if pc.frame_ids is None:
        raise ValueError("this point cloud has no per-point frame_ids (built by an older generator or loaded "
                         "without them), so its points cannot be split by frame; regenerate it")
    split = split_by_tracks(pc.points, pc.colors, pc.frame_ids, tracks, margin, clearance)
    keep = split.background
    return replace(pc, points=pc.points[keep], colors=pc.colors[keep], frame_ids=pc.frame_ids[keep],
                   dynamic={**pc.dynamic, **split.dynamic}, tracks={**pc.tracks, **{k: tracks[k] for k in split.dynamic}},
                   dynamic_frames={**pc.dynamic_frames, **split.dynamic_frames},
                   metadata={**pc.metadata, "split_tracks": len(split.dynamic)})
