"""The example plugin end to end: installed, found by evolsplat-ns's registry through its entry
point only, correct as a loss, and selectable for training by name."""

from __future__ import annotations

import math

import pytest
import torch

from evolsplat_edge_loss import l1_edge_loss


def test_installed_plugin_is_found_through_its_entry_point():
    from importlib.metadata import entry_points

    from evolsplat_ns import registry

    (ep,) = [e for e in entry_points(group="evolsplat_ns.losses") if e.name == "l1_edge"]
    assert ep.dist is not None and ep.dist.name == "evolsplat-edge-loss", "declared by the installed plugin"
    assert "l1_edge" in registry.available("losses")
    assert registry.get("losses", "l1_edge") is l1_edge_loss


def test_loss_values_and_gradient():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(16, 20, 3, generator=g)
    assert l1_edge_loss(gt, gt, 0.2) == 0
    # A constant brightness shift changes L1 but no gradient: only the L1 term is paid.
    assert l1_edge_loss(gt + 0.1, gt).item() == pytest.approx(0.1, rel=1e-5)
    blurred = (gt + gt.roll(1, 0) + gt.roll(1, 1)) / 3
    assert l1_edge_loss(blurred, gt) > (blurred - gt).abs().mean()  # soft edges pay the edge term
    pred = blurred.clone().requires_grad_(True)
    l1_edge_loss(pred, gt).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_trains_evolsplat_lite_when_selected_by_name(tmp_path):
    """``--pipeline.model.rgb-loss l1_edge``: a real training step with the plugin's loss."""
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset
    from evolsplat_ns.method_configs import evolsplat_lite_config

    torch.set_num_threads(1)  # spconv on CPU is only correct single-threaded
    data = tmp_path / "data"
    generate_dataset(SynthConfig(scenes=2, frames=8, cameras=2, width=48, height=32, lidar_beams=8,
                                 lidar_azimuths=128, moving_cars=0, seed=3), data)
    cfg = evolsplat_lite_config()
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.pipeline.datamanager.dataset.preload = False
    cfg.pipeline.datamanager.dataset.segment_length = 8
    cfg.pipeline.model.max_gaussians_per_segment = 800
    cfg.pipeline.model.rgb_loss = "l1_edge"
    cfg.output_dir, cfg.timestamp, cfg.vis, cfg.machine.device_type = tmp_path / "runs", "run", "tensorboard", "cpu"
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    try:
        assert trainer.pipeline.model.rgb_loss is l1_edge_loss
        loss, loss_dict, _ = trainer.train_step(0)
        assert math.isfinite(float(loss)) and float(loss_dict["rgb_loss"]) > 0
    finally:
        trainer.pipeline.datamanager.dataset.close()
