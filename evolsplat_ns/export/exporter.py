"""Export the Gaussians of chosen segments of a run's dataset, one standard 3DGS PLY per segment."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.data.types import SegmentKey
from evolsplat_ns.export.segment import predict_segment_gaussians, splat_comments
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


def export_splats(model: EVolSplatModel, dataset: MultiSceneDataset, segments: Sequence[int], output_dir: Path,
                  include_background: bool = False, overwrite: bool = False,
                  on_written: Optional[Callable[[Path, int, SegmentKey], None]] = None) -> list[Path]:
    """Write one PLY per segment in ``segments`` under ``output_dir``; returns the paths.

    Refuses (FileExistsError, before writing anything) when a target file exists and not
    ``overwrite``. ``on_written(path, count, segment key)`` is called after each file.
    """
    output_dir = Path(output_dir)
    targets = [output_dir / splat_filename(dataset.key(i)) for i in segments]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to replace existing {', '.join(existing)}: pass --overwrite")
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, path in zip(segments, targets):
        seg = predict_segment_gaussians(model, dataset, i, include_background)
        save_splat(path, seg.gaussians, splat_comments(seg), overwrite=overwrite)
        if on_written is not None:
            on_written(path, len(seg.gaussians), dataset.key(i))
    return targets
