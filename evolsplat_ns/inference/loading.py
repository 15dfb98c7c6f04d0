"""Load a trained run (its ``config.yml`` + latest checkpoint) as an EVolSplat pipeline, optionally
over a different dataset and optionally with fresh, untrained weights.

This is nerfstudio's ``eval_setup`` with two additions: dataset overrides applied before the data
manager is built, and ``untrained`` (same architecture, no checkpoint) for baselines. It does not
import ``nerfstudio.utils.eval_utils``, whose import of every registered method costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from evolsplat_ns.engine.checkpoints import newest_loadable_checkpoint
from evolsplat_ns.utils.errors import ConfigError
from evolsplat_ns.utils.run_config import load_run_config

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig

    from evolsplat_ns.engine.pipeline import EVolSplatPipeline


@dataclass
class DatasetOverrides:
    """Changes to the run's ``MultiSceneDatasetConfig`` (None = keep the run's value).

    New data (``data``) is read as it is, not through the run's data settings: all its cameras
    (whatever the run selected), any rig, and hold-out/selection adapted to its scenes
    (``eval_hold_out="auto"``, see :mod:`evolsplat_ns.data.dataset`); the fields below override that.
    The run's ``downscale``, segment length and source count stay (the model was sized for them)
    unless given.
    """

    data: Optional[Path] = None
    """Dataset folder to use instead of the run's."""
    all_scenes_eval: bool = False
    """Treat every scene as an eval scene (zero-shot evaluation of new scenes)."""
    eval_frame_interval: Optional[int] = None
    """Hold out every k-th frame of eval scenes."""
    hold_out: Optional[str] = None
    """``auto``, ``frames`` or ``cameras`` (None: ``auto`` for new data, else the run's)."""
    eval_cameras: Optional[tuple[int, ...]] = None
    """Cameras held out in camera hold-out (default: each camera in turn)."""
    cameras: Optional[tuple[int, ...]] = None
    """Cameras to load (None: all of the new data's, else the run's)."""
    num_source_keyframes: Optional[int] = None
    """Source keyframes per target (each with every camera); capped by what a segment holds."""
    segment_length: Optional[int] = None
    """Frames per segment (0 = whole scene)."""


def _apply_overrides(config: TrainerConfig, o: DatasetOverrides) -> None:
    """Edit the trainer config's dataset settings in place (before the data manager is built)."""
    dm = config.pipeline.datamanager
    ds = dm.dataset
    if o.data is not None:
        if not Path(o.data).is_dir():
            raise FileNotFoundError(f"--data {o.data} is not a folder of scenes (or a scene folder)")
        dm.data = Path(o.data)
        ds.data = Path(o.data)
        ds.cameras = None  # the new data's own rig, not the run's camera selection
        ds.eval_hold_out = "auto"
        ds.eval_cameras = ()
    for name, value in (("eval_frame_interval", o.eval_frame_interval), ("eval_hold_out", o.hold_out),
                        ("eval_cameras", o.eval_cameras), ("cameras", o.cameras),
                        ("num_source_keyframes", o.num_source_keyframes), ("segment_length", o.segment_length)):
        if value is not None:
            setattr(ds, name, tuple(value) if isinstance(value, list) else value)
    if o.all_scenes_eval:
        from evolsplat_ns.data.sources import get_source

        ds.eval_scenes = ()
        ds.num_eval_scenes = len(get_source(ds.data_source).find_scenes(Path(ds.data)))
        # The data manager needs one "train" segment for the viewer's image set; nothing trains.
        ds.train_on_eval_scenes = True
        if ds.eval_frame_interval <= 0:
            raise ValueError("the run's dataset.eval_frame_interval is 0 (no held-out frames): pass "
                             "--eval-frame-interval K to hold out every K-th frame")
    ds.preload = False  # no training loop to overlap point-cloud building with


def load_pipeline(config_path: Path, overrides: Optional[DatasetOverrides] = None, untrained: bool = False,
                  device: Optional[str] = None) -> tuple[TrainerConfig, EVolSplatPipeline, Optional[Path]]:
    """The run's pipeline in eval mode.

    Args:
        config_path: a run's ``config.yml`` (written by ns-train).
        overrides: dataset changes (new data, all scenes held out); None = the run's dataset.
        untrained: skip the checkpoint: freshly initialised weights (seeded by the run's
            ``machine.seed``), for "trained vs untrained" comparisons.
        device: torch device; default CUDA when available, else CPU (as nerfstudio's eval_setup).
    Returns:
        (trainer config, EVolSplatPipeline, checkpoint path or None).
    """
    from nerfstudio.engine.trainer import TrainerConfig

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"--load-config {config_path} does not exist (a run's config.yml)")
    config = load_run_config(config_path)  # refuses Python tags other than config types
    if not isinstance(config, TrainerConfig):
        raise ConfigError(f"{config_path} is not a nerfstudio trainer config")
    overrides = overrides or DatasetOverrides()
    _apply_overrides(config, overrides)
    config.load_dir = config.get_checkpoint_dir()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.machine.seed)
    pipeline = config.pipeline.setup(device=device, test_mode="test")
    pipeline.eval()
    checkpoint = None if untrained else load_latest_checkpoint(Path(config.load_dir), pipeline)
    if overrides.data is not None:
        # Checkpointed per-segment nodes belong to the training scenes; new scenes may reuse their
        # names (000, 001, ...), so keep none of them.
        pipeline.model.forget_segments()
    return config, pipeline, checkpoint


def load_latest_checkpoint(checkpoint_dir: Path, pipeline: EVolSplatPipeline) -> Path:
    """Load the newest ``step-*.ckpt`` of ``checkpoint_dir`` that loads into ``pipeline`` (broken
    newer ones are named and skipped, other files ignored); returns its path."""
    path, state = newest_loadable_checkpoint(Path(checkpoint_dir))
    pipeline.load_pipeline(state["pipeline"], state["step"])
    return path
