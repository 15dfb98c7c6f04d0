"""Tiny CPU evolsplat-lite runs for tests: a set-up trainer, and a trained, saved checkpoint.

Training in-process avoids ns-train's start-up cost. ``tiny_checkpoint`` saves like ns-train
(``config.yml`` + ``nerfstudio_models/step-*.ckpt``) once per pytest session and is shared by the
viewer, export and inference tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

TRAIN_STEPS = 4


def lite_trainer(data: Path, out: Path, load_dir: Path | None = None, experiment: str | None = None,
                 configure: Callable[[Any], None] | None = None, config_fn: Callable[[], Any] | None = None,
                **trainer_settings):
    """An evolsplat-lite trainer on ``data`` (CPU, 1500 Gaussians per segment), set up and seeded.
    ``configure(config)`` may change the trainer config before set-up; ``trainer_settings`` set
    fields of its ``EVolSplatTrainerConfig`` (e.g. ``deterministic=True``); ``config_fn`` gives another
    lite method's config (default ``evolsplat_lite_config``)."""
    from evolsplat_ns.method_configs import evolsplat_lite_config

    torch.manual_seed(0)
    cfg = (config_fn or evolsplat_lite_config)()
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.experiment_name = experiment
    cfg.pipeline.datamanager.dataset.preload = False
    cfg.pipeline.model.max_gaussians_per_segment = 1500
    cfg.output_dir = out
    cfg.timestamp = "run"
    cfg.vis = "tensorboard"
    cfg.machine.device_type = "cpu"
    cfg.load_dir = load_dir
    for name, value in trainer_settings.items():
        setattr(cfg, name, value)
    if configure is not None:
        configure(cfg)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def params_vector(trainer) -> torch.Tensor:
    """Every model parameter of ``trainer``, flattened into one vector (to compare steps)."""
    return torch.cat([p.detach().flatten() for p in trainer.pipeline.model.parameters()])


def tiny_checkpoint(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``config.yml`` of an evolsplat-lite run trained ``TRAIN_STEPS`` steps on ``data`` (CPU)."""
    out = tmp_path_factory.getbasetemp() / "viewer_run"
    config_path = out / "tiny" / "evolsplat-lite" / "run" / "config.yml"
    if config_path.is_file():
        return config_path
    trainer = lite_trainer(data, out, experiment="tiny")
    for step in range(TRAIN_STEPS):
        trainer.train_step(step)
    trainer.save_checkpoint(TRAIN_STEPS - 1)
    trainer.config.save_config()
    trainer.pipeline.datamanager.dataset.close()
    assert config_path.is_file(), f"expected the run's config at {config_path}"
    return config_path
