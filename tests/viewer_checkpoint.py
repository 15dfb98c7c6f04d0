"""A tiny trained evolsplat-lite run for the viewer tests (shared by test_viewer*.py).

Trained in-process (no ns-train start-up cost) for a few steps on the session's ``tiny_dataset``
and saved like ns-train saves it (``config.yml`` + ``nerfstudio_models/step-*.ckpt``), once per
pytest session: the run lives under the session's base temp folder and is reused when present.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TRAIN_STEPS = 4


def tiny_checkpoint(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``config.yml`` of an evolsplat-lite run trained ``TRAIN_STEPS`` steps on ``data`` (CPU)."""
    from evolsplat_ns.method_configs import evolsplat_lite_config

    out = tmp_path_factory.getbasetemp() / "viewer_run"
    config_path = out / "tiny" / "evolsplat-lite" / "run" / "config.yml"
    if config_path.is_file():
        return config_path
    torch.manual_seed(0)
    cfg = evolsplat_lite_config()
    cfg.data = data
    cfg.experiment_name = "tiny"
    cfg.pipeline.datamanager.data = data
    cfg.pipeline.datamanager.dataset.preload = False
    cfg.pipeline.model.max_gaussians_per_segment = 1500
    cfg.output_dir = out
    cfg.timestamp = "run"
    cfg.vis = "tensorboard"
    cfg.machine.device_type = "cpu"
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    for step in range(TRAIN_STEPS):
        trainer.train_iteration(step)
    trainer.save_checkpoint(TRAIN_STEPS - 1)
    cfg.save_config()
    trainer.pipeline.datamanager.dataset.close()
    assert config_path.is_file(), f"expected the run's config at {config_path}"
    return config_path
