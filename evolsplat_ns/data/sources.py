"""Data sources: how a ``--data`` path becomes scenes. Registered under ``evolsplat_ns.data_sources``.

A data source is a class with ``find_scenes(data) -> list[Path]`` and
``open_scene(path, downscale, cameras) -> SceneData``, and optionally
``validate_scene(path, full, min_frames) -> SceneValidation`` (run on every scene before training). A third-party format (e.g. another
dataset's processed layout) provides one that reads its own files into :class:`SceneData`'s
contract: OpenCV camera-to-vehicle calibration, vehicle-to-world poses, per-frame loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from evolsplat_ns.data.layout import find_scenes
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.validate import SceneValidation, validate_scene


class DataSource(Protocol):
    def find_scenes(self, data: Path) -> list[Path]: ...

    def open_scene(self, path: Path, downscale: float, cameras: Sequence[int] | None) -> SceneData: ...


class DrivestudioSource:
    """drivestudio's processed layout (``processed/training/000``, ...), see :mod:`layout`."""

    def find_scenes(self, data: Path) -> list[Path]:
        return find_scenes(data)

    def open_scene(self, path: Path, downscale: float, cameras: Sequence[int] | None) -> SceneData:
        return SceneData(path, downscale, cameras)

    def validate_scene(self, path: Path, full: bool, min_frames: int) -> SceneValidation:
        return validate_scene(path, full=full, min_frames=min_frames)


def get_source(name: str) -> DataSource:
    """Instantiate the data source registered as ``name``."""
    from evolsplat_ns import registry

    return registry.get("data_sources", name)()
