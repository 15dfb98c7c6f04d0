"""The nearest-source-view baseline: forward splatting with depth, scored like the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def eval_dataset(tiny_dataset):
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig

    ds = MultiSceneDataset(MultiSceneDatasetConfig(data=tiny_dataset / "001", num_eval_scenes=1, eval_frame_interval=4,
                                                   preload=False))
    yield ds
    ds.close()


def test_splat_to_own_pose_is_the_image(eval_dataset):
    """A source reprojected into its own camera gives back its pixels (z-buffer picks each one)."""
    from evolsplat_ns.inference.reprojection import source_points, splat

    sample = eval_dataset.eval_sample(0)
    pts, cols = source_points(eval_dataset, sample, 0)
    src = sample.source
    rgb, valid = splat(pts, cols, src.intrinsics[0], src.camtoworlds[0], src.width, src.height, fill_radius=0)
    assert valid.float().mean() > 0.99
    assert torch.allclose(rgb[valid], src.images[0][valid], atol=1e-6)


def test_rotation_only_moves_sky_by_homography():
    """Points at infinity (no depth) move by the rotation: a pixel lands where K R K^-1 maps it."""
    from evolsplat_ns.inference.reprojection import FAR, splat, unproject

    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    src = torch.eye(4)
    index = torch.arange(48 * 64, dtype=torch.float32)
    image = torch.stack([index % 64, index // 64, torch.zeros_like(index)], dim=-1).reshape(48, 64, 3)  # (x, y) code
    pts = unproject(torch.full((48, 64), FAR), K, src).reshape(-1, 3)
    yaw = math.radians(5)
    tgt = torch.eye(4)
    tgt[:3, :3] = torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    rgb, valid = splat(pts, image.reshape(-1, 3), K, tgt, 64, 48, fill_radius=0)
    assert valid.float().mean() > 0.8  # the 5 degree turn leaves the edge it turned to unseen
    checked = 0
    for v, u in valid.nonzero()[::37].tolist():
        d = tgt[:3, :3] @ torch.linalg.solve(K, torch.tensor([u + 0.5, v + 0.5, 1.0]))  # target ray, source frame
        s = K @ (d / d[2])  # where it meets the source image: the homography K R K^-1
        assert (rgb[v, u, :2] + 0.5 - s[:2]).abs().max() <= 1.0, (u, v, rgb[v, u], s)
        checked += 1
    assert checked > 20


def test_nearest_source_scores_every_held_out_view(eval_dataset):
    from evolsplat_ns.inference.reprojection import evaluate_nearest_source

    seen = []
    report = evaluate_nearest_source(eval_dataset, on_view=lambda s, v, out, m: seen.append(m["psnr"]))
    assert report["num_views"] == eval_dataset.num_eval_views == len(seen) == 3 * 3
    assert math.isfinite(report["psnr"]) and report["psnr"] > 12.0, report["psnr"]
    assert {"psnr_sky", "psnr_non_sky", "psnr_static"} <= set(report)
    assert np.isclose(report["psnr"], np.mean(seen))
