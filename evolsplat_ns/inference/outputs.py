"""The files ``evolsplat-infer`` writes in its output folder, and the no-overwrite rule."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class InferOutputs:
    """Paths under the output folder: ``metrics.json``, ``grid.png`` and ``camera_path.mp4`` (or the
    PNG-sequence folder ``camera_path/`` when ffmpeg is unavailable)."""

    folder: Path

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def grid(self) -> Path:
        return self.folder / "grid.png"

    @property
    def video(self) -> Path:
        return self.folder / "camera_path.mp4"

    @property
    def video_frames(self) -> Path:
        return self.folder / "camera_path"

    def claim(self, overwrite: bool) -> None:
        """Create the folder; refuse (FileExistsError) if any output exists and not ``overwrite``.

        Checked before any work, so a refused run leaves the folder untouched.
        """
        existing = [str(p) for p in (self.metrics, self.grid, self.video, self.video_frames) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"refusing to replace existing {', '.join(existing)}: pass --overwrite")
        self.folder.mkdir(parents=True, exist_ok=True)


GRID_COLUMNS = ("prediction", "ground truth", "|error|")
"""Titles of a grid row's three panels, left to right."""


def save_grid(rows: Sequence[np.ndarray], path: Path, row_labels: Sequence[str] | None = None,
              column_titles: Sequence[str] = GRID_COLUMNS) -> Path:
    """Stack uint8 [H, W, 3] rows (one view each: prediction | ground truth | error) into one PNG.

    Labels are drawn into the images (the grid keeps its size): ``column_titles`` at the top of
    the first row's panels, ``row_labels[i]`` (e.g. view and PSNR) at the bottom left of row i.
    """
    from PIL import Image

    if not rows:
        raise ValueError("no rendered views for the grid")
    # Scenes may differ in image size: pad narrower rows with black on the right.
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    image = Image.fromarray(np.concatenate(padded, axis=0))
    panel = rows[0].shape[1] // max(1, len(column_titles))
    for k, title in enumerate(column_titles):
        _label(image, (k * panel + 1, 1), title)
    top = 0
    for row, label in zip(rows, row_labels or []):
        top += row.shape[0]
        _label(image, (1, top - 12), label)
    image.save(path)
    return path


def _label(image, xy: tuple[int, int], text: str) -> None:
    """``text`` in white on a black box at ``xy`` (PIL's built-in bitmap font: no font files)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    box = draw.textbbox(xy, text)
    draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255))


def save_metrics(report: dict, path: Path) -> Path:
    """``report`` as indented JSON."""
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path
