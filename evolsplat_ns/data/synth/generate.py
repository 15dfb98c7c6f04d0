"""Generating synthetic scenes: street -> per-frame ray casting -> drivestudio files."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from evolsplat_ns.data.synth.config import SynthConfig
from evolsplat_ns.data.synth.render import lidar_sweep, render_cameras
from evolsplat_ns.data.synth.sensors import Raycaster, lidar_directions, make_rig
from evolsplat_ns.data.synth.street import build_street
from evolsplat_ns.data.synth.writer import SceneWriter


class SceneExistsError(FileExistsError):
    """A target scene folder exists and is not empty, and overwriting was not asked for."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path}: scene folder already exists and is not empty; "
                         f"choose another output folder or pass --overwrite (SynthConfig.overwrite=True) "
                         f"to replace it")


def scene_dir(out: Path, scene_index: int) -> Path:
    """drivestudio scene naming: ``out/000``, ``out/001``, ..."""
    return Path(out) / f"{scene_index:03d}"


def _check_target(cfg: SynthConfig, path: Path) -> None:
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not cfg.overwrite):
        raise SceneExistsError(path)


def generate_scene(cfg: SynthConfig, scene_index: int, out_dir: Path) -> Path:
    """Generate scene ``scene_index`` into ``out_dir/{scene_index:03d}`` and return that folder.

    Deterministic: the scene draws everything from ``numpy.random.default_rng(cfg.seed + scene_index)``.
    Raises ``SceneExistsError`` if the folder is non-empty and ``cfg.overwrite`` is False.
    """
    root = scene_dir(out_dir, scene_index)
    _check_target(cfg, root)
    street = build_street(cfg, np.random.default_rng(cfg.seed + scene_index))
    rig, lidar_dirs = make_rig(cfg), lidar_directions(cfg)
    caster = Raycaster(street, cfg.raycaster, cfg.device)
    writer = SceneWriter(root, cfg)
    writer.clear()
    writer.write_calibration(rig)
    # Files of frame t are encoded and written on a thread while frame t+1 renders.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        for t in range(cfg.frames):
            time = t * cfg.dt
            next_time = time + cfg.dt if t + 1 < cfg.frames else None
            caster.set_time(time)
            frame = render_cameras(street, rig, caster, time, next_time, cfg.shadows)
            lidar = lidar_sweep(street, caster, lidar_dirs, time, cfg.lidar_range)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_frame, t, street.street_to_world @ street.ego.pose(time),
                                  frame, lidar)
        pending.result()
    writer.write_instances(street)
    return root


def generate_dataset(cfg: SynthConfig, out: Path) -> list[Path]:
    """Generate ``cfg.scenes`` scenes under ``out`` (``out/{first_scene:03d}``, ...) and return their folders.

    Every target folder is checked before anything is written, so a refused run writes nothing.
    """
    out = Path(out)
    indices = range(cfg.first_scene, cfg.first_scene + cfg.scenes)
    for i in indices:
        _check_target(cfg, scene_dir(out, i))
    return [generate_scene(cfg, i, out) for i in indices]
