"""What the fast training step relies on, checked as behaviour on CPU (no timings here: speed is
measured by benchmarks/train_throughput.py and benchmarks/viewer_fps.py).

Mixed precision keeps geometry and losses in fp32; targets that choose the same sources share one
visibility test; the sky dome is predicted once per step; the fused SSIM is pytorch_msssim's SSIM;
the z-buffer needs no boolean masking; point-cloud generators take their own options from the
dataset config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_msssim import ssim

from evolsplat_ns.model.evolsplat_model import _union
from evolsplat_ns.model.losses import fused_ssim
from evolsplat_ns.model.precision import full_precision, sparse_conv_precision
from evolsplat_ns.model.projector import Projector, zbuffer_depth
from test_model_parts import make_cloud, make_views, surrogate_loss, targets, tiny_setup


@pytest.mark.parametrize("shape", [(40, 56, 3), (9, 30, 3)])
def test_fused_ssim_is_pytorch_msssim(shape):
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    gt = torch.rand(shape, generator=g, dtype=torch.float64)
    win = 11 if min(shape[:2]) >= 11 else 9  # the (9, 30) image takes the fallback path
    ref = ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0, win_size=win)
    ours = fused_ssim(pred, gt, win)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref, pred)
    (g_ours,) = torch.autograd.grad(ours, pred)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_projection_ignores_autocast():
    points = make_cloud(200).points
    views = make_views([-0.5, 0.0, 0.5])
    plain = Projector().sample(points, views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = Projector().sample(points, views)
    assert mixed.colors.dtype == torch.float32
    assert torch.equal(mixed.colors, plain.colors) and torch.equal(mixed.valid, plain.valid)
    assert torch.equal(mixed.occlusion, plain.occlusion)


def test_precision_rules():
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision(cpu):
            assert not torch.is_autocast_enabled("cpu")
        with sparse_conv_precision(cpu):  # spconv would run fp16 without a loss scale: fp32
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")


def test_zbuffer_without_masking_matches_masked_reference():
    g = torch.Generator().manual_seed(0)
    uv = torch.rand(2, 500, 2, generator=g) * torch.tensor([40.0, 30.0]) - 4.0  # some off-image
    depth = torch.rand(2, 500, generator=g) * 10 + 1
    valid = (uv[..., 0] >= 0) & (uv[..., 0] < 32) & (uv[..., 1] >= 0) & (uv[..., 1] < 24)
    got = zbuffer_depth(uv, depth, valid, (24, 32), 4)
    cell = (uv / 4).floor().long()
    cx, cy = cell[..., 0].clamp(0, 7), cell[..., 1].clamp(0, 5)
    flat = (torch.arange(2)[:, None] * 6 + cy) * 8 + cx
    ref = torch.full((2 * 6 * 8,), float("inf")).scatter_reduce(0, flat[valid], depth[valid], reduce="amin")[flat]
    assert torch.equal(got, ref)


def test_targets_choosing_the_same_sources_share_view_inputs():
    model, node, source = tiny_setup()
    model.projector.num_neighbour_select = 3  # = number of sources: every target picks all three
    state = model.encode(node, source)
    (c2w_a, K), (c2w_b, _) = targets()
    a, b = model.predict(state, c2w_a, K), model.predict(state, c2w_b, K)
    assert len(state.view_inputs) == 1 and a.index is b.index
    assert _union([a.index, b.index], a.index.device) is a.index
    model.projector.num_neighbour_select = 1  # nearest source only: the two targets differ
    c = model.predict(state, c2w_b, K)
    assert len(state.view_inputs) == 2
    union = _union([a.index, c.index], a.index.device)
    assert torch.equal(union, torch.unique(torch.cat([a.index, c.index])))


def test_sky_dome_is_predicted_once_per_state():
    model, node, source = tiny_setup()
    state = model.encode(node, source)
    first, again = model.predict_background(state), model.predict_background(state)
    assert first is again and first.sh.is_leaf and first.sh.requires_grad  # behind the boundary
    c2w, K = targets()[0]
    (surrogate_loss(model.predict(state, c2w, K), 1.0) + first.sh.square().sum()).backward()
    assert model.background.refine[0].weight.grad is None  # not yet: the shared part runs once
    state.backward_shared()
    assert model.background.refine[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        frozen = model.encode(node, source)
    assert not frozen.background.sh.requires_grad


def test_bf16_autocast_losses_are_fp32_and_close(tiny_dataset, tmp_path):
    from tiny_run import lite_trainer

    trainer = lite_trainer(tiny_dataset, tmp_path)
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    model.eval()
    sample, batch = pipeline.datamanager.next_train(0)
    with torch.no_grad():
        plain = model.sample_loss(sample, batch["point_cloud"], step=1)
        mixed = model.sample_loss(sample, batch["point_cloud"], step=1,
                                  autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert mixed.losses.keys() == plain.losses.keys()
    for k in plain.losses:
        assert mixed.losses[k].dtype == torch.float32
        torch.testing.assert_close(mixed.losses[k], plain.losses[k], rtol=0.05, atol=1e-3)
    assert not mixed.nonfinite and not plain.nonfinite


def test_generator_options_come_from_the_dataset_config(tiny_dataset):
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig
    from evolsplat_ns.data.pointcloud.base import make_generator
    from evolsplat_ns.data.pointcloud.depth import DepthPointCloudConfig

    counts = {}
    for stride in (1, 4):
        cfg = MultiSceneDatasetConfig(data=Path(tiny_dataset), pointcloud_generator="depth", preload=False,
                                      pointcloud=DepthPointCloudConfig(pixel_stride=stride, voxel_size=0.0))
        counts[stride] = len(MultiSceneDataset(cfg).point_cloud(0))
    assert counts[1] > 4 * counts[4] > 0
    with pytest.raises(ValueError, match="pixel_stride"):
        make_generator("lidar", pixel_stride=2)
