"""Export the Gaussians of chosen segments of a run's dataset, one standard 3DGS PLY per segment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.data.types import SegmentKey
from evolsplat_ns.export.segment import SegmentGaussians, predict_segment_gaussians, splat_comments
from evolsplat_ns.export.splat import save_splat

if TYPE_CHECKING:
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel


def select_segments(dataset: MultiSceneDataset, selectors: Sequence[str]) -> list[int]:
    """Indices of the segments named by ``selectors`` (all segments when empty).

    A selector is a segment key ``SCENE/segNNN`` (as printed by evolsplat-data and written in PLY
    comments) or a scene name ``SCENE`` (all of its segments).
    """
    if not selectors:
        return list(range(len(dataset.segments)))
    keys = [str(dataset.key(i)) for i in range(len(dataset.segments))]
    chosen: list[int] = []
    for sel in selectors:
        hits = [i for i, k in enumerate(keys) if k == sel or dataset.key(i).scene == sel]
        if not hits:
            raise ValueError(f"--segment {sel!r} matches no segment of {dataset.config.data}; "
                             f"segments: {', '.join(keys)}")
        chosen += [i for i in hits if i not in chosen]
    return chosen


def splat_filename(key: SegmentKey) -> str:
    """``{scene}_seg{NNN}.ply``: one file per segment, flat in the output folder."""
    return f"{key.scene}_seg{key.segment:03d}.ply"


def actors_filename(key: SegmentKey) -> str:
    """``{scene}_seg{NNN}_actors.json``: the segment's moving actors (tracks + their PLY files)."""
    return f"{key.scene}_seg{key.segment:03d}_actors.json"


def write_actors(seg: SegmentGaussians, output_dir: Path, overwrite: bool = False) -> Optional[Path]:
    """Per moving actor of ``seg``, its Gaussians in its object frame (box-local: x along the length,
    y width, z up, origin at the box centre) as ``{stem}_actors/{ID}.ply``, and ``{stem}_actors.json``:
    per actor its PLY, box size and per-frame object-to-segment pose (null where it has no box).
    Placing actor Gaussians at frame t: ``obj_to_segment[t]`` on means and rotations. None without actors."""
    if seg.actors is None or seg.actor_nodes is None:
        return None
    nodes, stem = seg.actor_nodes, splat_filename(seg.key)[: -len(".ply")]
    entry = {"segment": str(seg.key), "frame": "segment frame (vehicle frame at the segment's first frame)",
             "segment_to_world": seg.segment_to_world.tolist(), "frames": nodes.frames.tolist(), "actors": {}}
    for row, inst in enumerate(nodes.ids or [str(r) for r in range(nodes.num_actors)]):
        ply = output_dir / f"{stem}_actors" / f"{inst}.ply"
        ply.parent.mkdir(exist_ok=True)
        save_splat(ply, nodes.gaussians_of(seg.actors, row),
                   [f"segment {seg.key} actor {inst}", "frame: object (box-local) frame; pose per frame in "
                    f"{actors_filename(seg.key)}"], overwrite=overwrite)
        entry["actors"][inst] = {"ply": f"{ply.parent.name}/{ply.name}", "box_size": nodes.sizes[row].tolist(),
                                 "obj_to_segment": [p.tolist() if ok else None for p, ok in
                                                    zip(nodes.poses[row], nodes.valid[row].tolist())]}
    path = output_dir / actors_filename(seg.key)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to replace existing {path}: pass --overwrite")
    path.write_text(json.dumps(entry, indent=1))
    return path


def export_splats(model: EVolSplatModel, dataset: MultiSceneDataset, segments: Sequence[int], output_dir: Path,
                  include_background: bool = False, overwrite: bool = False,
                  on_written: Optional[Callable[[Path, int, SegmentKey], None]] = None,
                  actors_at: Optional[float] = None) -> list[Path]:
    """Write one PLY per segment in ``segments`` under ``output_dir``; returns the paths.

    Moving actors: with ``actors_at`` (a frame) posed at that time inside the segment's PLY,
    otherwise in their own object-frame PLYs with a tracks JSON (:func:`write_actors`).
    Refuses (FileExistsError, before writing anything) when a target file exists and not
    ``overwrite``. ``on_written(path, count, segment key)`` is called after each file.
    """
    output_dir = Path(output_dir)
    targets = [output_dir / splat_filename(dataset.key(i)) for i in segments]
    existing = [str(p) for p in targets + [output_dir / actors_filename(dataset.key(i)) for i in segments]
                if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to replace existing {', '.join(existing)}: pass --overwrite")
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, path in zip(segments, targets):
        seg = predict_segment_gaussians(model, dataset, i, include_background, actors_at)
        save_splat(path, seg.gaussians, splat_comments(seg), overwrite=overwrite)
        if on_written is not None:
            on_written(path, len(seg.gaussians), dataset.key(i))
        tracks = write_actors(seg, output_dir, overwrite)
        if tracks is not None and on_written is not None:
            on_written(tracks, len(seg.actors.means), dataset.key(i))
    return targets
