"""Scenes -> segments -> keyframes, the train/eval frame split, and source/target selection.

A *segment* is a run of ``segment_length`` consecutive frames of one scene, started every
``segment_stride`` frames (stride < length gives overlap). Its *keyframes* are every
``keyframe_interval``-th frame. A sample picks ``num_target_keyframes`` target keyframes and
``num_source_keyframes`` source keyframes from the same segment, each contributing all cameras.

Short segments (:func:`select_train_views`): with fewer keyframes than ``num_source +
num_target``, targets shrink first to leave one source keyframe (``between`` becomes ``nearest``
when one source remains); a one-keyframe segment holds out one camera of its frame as the target
and uses the other cameras of that frame as sources. Only a segment of one keyframe seen by one
camera cannot make a sample (:func:`can_sample`). A target view is never among its sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

SelectionMode = Literal["between", "beside", "nearest"]
ViewPair = tuple[int, int]
"""One camera image: (scene frame index t, camera id)."""


@dataclass
class SegmentSpec:
    """A segment of one scene: ``frames`` are its keyframes (scene frame indices, ascending)."""

    scene_index: int
    segment_index: int
    frames: list[int]
    whole_scene: bool = False
    """The segment holds all context frames of its scene (no longer segment exists): a segment of
    too few keyframes then adapts instead of being a setting to fix."""
    held_out_camera: Optional[int] = None
    """Camera hold-out (eval only): this camera's views are the segment's targets; it is never a
    source and colours none of the segment's points."""


def can_sample(num_keyframes: int, num_cameras: int) -> bool:
    """Whether a segment can give one target and one other source view."""
    return num_keyframes >= 2 or (num_keyframes == 1 and num_cameras >= 2)


def select_train_views(
    keyframes: Sequence[int],
    cameras: Sequence[int],
    num_source: int,
    num_target: int,
    mode: SelectionMode,
    rng: np.random.Generator,
    poses: dict[int, np.ndarray] | None = None,
) -> tuple[list[ViewPair], list[ViewPair]]:
    """(source, target) views of one training sample, adapted to short segments (module docstring).

    With enough keyframes this is :func:`select_train_keyframes` with every camera of each frame
    (and draws the same random numbers).
    """
    kf, cams = list(keyframes), list(cameras)
    if not can_sample(len(kf), len(cams)):
        raise ValueError(f"a segment of {len(kf)} keyframe(s) seen by {len(cams)} camera(s) cannot give one "
                         "target and one source view; add frames or cameras")
    if len(kf) == 1:
        held = int(cams[int(rng.integers(0, len(cams)))])
        return [(kf[0], c) for c in cams if c != held], [(kf[0], held)]
    ns, nt, mode = adapt_counts(len(kf), num_source, num_target, mode)
    src, tgt = select_train_keyframes(kf, ns, nt, mode, rng, poses)
    return [(t, c) for t in src for c in cams], [(t, c) for t in tgt for c in cams]


def adapt_counts(num_keyframes: int, num_source: int, num_target: int,
                 mode: SelectionMode) -> tuple[int, int, SelectionMode]:
    """(source, target) keyframe counts and mode that fit ``num_keyframes`` >= 2 keyframes:
    unchanged when they fit; else targets shrink first (to 1), then sources."""
    if num_source + num_target <= num_keyframes:
        return num_source, num_target, mode
    nt = max(1, min(num_target, num_keyframes - 1))
    ns = max(1, min(num_source, num_keyframes - nt))
    return ns, nt, ("nearest" if mode == "between" and ns < 2 else mode)


def split_segments(frames: Sequence[int], length: int, stride: int) -> list[list[int]]:
    """Cut ascending ``frames`` into windows of ``length`` started every ``stride`` frames.

    The last window is aligned to the end so no frame is left out; a scene shorter than
    ``length`` is one segment. ``length <= 0`` means one segment per scene.
    """
    frames = list(frames)
    if length <= 0 or len(frames) <= length:
        return [frames]
    if stride <= 0:
        raise ValueError(f"segment_stride must be > 0, got {stride}")
    starts = list(range(0, len(frames) - length + 1, stride))
    if starts[-1] + length < len(frames):
        starts.append(len(frames) - length)
    return [frames[s : s + length] for s in starts]


def eval_frame_mask(frames: Sequence[int], interval: int) -> np.ndarray:
    """Bool mask over ``frames``: every ``interval``-th frame (offset interval // 2) is held out.

    Offsetting keeps held-out frames away from segment ends, so they lie between source frames.
    ``interval <= 0`` holds out nothing.
    """
    if interval == 1:  # nothing would be left to build segments and source views from
        raise ValueError("eval_frame_interval=1 holds out every frame of eval scenes; use 0 (hold out "
                         "nothing) or >= 2")
    n = len(frames)
    mask = np.zeros(n, dtype=bool)
    if interval > 0:
        mask[interval // 2 :: interval] = True
    return mask


def select_train_keyframes(
    keyframes: Sequence[int],
    num_source: int,
    num_target: int,
    mode: SelectionMode,
    rng: np.random.Generator,
    poses: dict[int, np.ndarray] | None = None,
) -> tuple[list[int], list[int]]:
    """Pick (source, target) keyframes from one segment's ``keyframes`` (no frame in both).

    - ``between``: a random window of ``num_source + num_target`` consecutive keyframes; sources at
      both ends and spread evenly, targets are the keyframes strictly inside.
    - ``beside``: sources are a random run of consecutive keyframes, targets the next ones beside it.
    - ``nearest`` (EVolSplat): targets at random; sources are the non-target keyframes whose vehicle
      positions (``poses``: frame -> [4, 4] vehicle-to-world) are nearest to the targets' mean.
    """
    kf = list(keyframes)
    need = num_source + num_target
    if len(kf) < need:
        raise ValueError(f"segment has {len(kf)} keyframes but {num_source} source + {num_target} "
                         f"target keyframes are needed; lower them or raise segment_length")
    if mode == "nearest":
        targets = sorted(rng.choice(kf, size=num_target, replace=False).tolist())
        rest = [f for f in kf if f not in targets]
        return nearest_sources(rest, targets, num_source, poses), targets
    start = int(rng.integers(0, len(kf) - need + 1))
    window = kf[start : start + need]
    if mode == "beside":
        if rng.random() < 0.5:
            return window[:num_source], window[num_source:]
        return window[num_target:], window[:num_target]
    if mode == "between":
        if num_source < 2:  # one source cannot enclose a target
            raise ValueError(f"selection 'between' needs >= 2 source keyframes, got {num_source}; "
                             f"use 'beside' or 'nearest' for a single source")
        src_pos = np.unique(np.round(np.linspace(0, need - 1, num_source)).astype(int))
        sources = [window[i] for i in src_pos]
        inner = [f for f in window if f not in sources]
        return sources, inner[:num_target]
    raise ValueError(f"unknown selection mode {mode!r}; use 'between', 'beside' or 'nearest'")


def nearest_sources(
    candidates: Sequence[int], targets: Sequence[int], num_source: int,
    poses: dict[int, np.ndarray] | None,
) -> list[int]:
    """The ``num_source`` candidate frames nearest to the targets (by vehicle position, else index)."""
    cand = list(candidates)
    if poses is not None:
        centre = np.mean([poses[t][:3, 3] for t in targets], axis=0)
        dist = [np.linalg.norm(poses[c][:3, 3] - centre) for c in cand]
    else:
        centre = float(np.mean(targets))
        dist = [abs(c - centre) for c in cand]
    order = np.argsort(dist, kind="stable")[:num_source]
    return sorted(cand[i] for i in order)
