"""Sky supervision: sky pixels supervise the background only; the sky region is a reported metric."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_run import lite_trainer


def _configure(cfg) -> None:
    cfg.pipeline.model.sky_loss_weight = 1.0
    cfg.pipeline.model.sky_opacity_weight = 0.0
    cfg.pipeline.datamanager.dataset.load_sky_masks = True


@pytest.fixture(scope="module")
def trainer(tiny_dataset, tmp_path_factory):
    return lite_trainer(tiny_dataset, tmp_path_factory.mktemp("sky_runs"), configure=_configure)


def test_training_samples_carry_sky_masks_and_sky_loss(trainer):
    loss, loss_dict, _ = trainer.train_step(1)
    assert "sky_loss" in loss_dict and math.isfinite(float(loss_dict["sky_loss"]))
    sample, _ = trainer.pipeline.datamanager.next_train(2)
    assert sample.target.sky_masks is not None and sample.target.sky_masks.any()


def test_sky_pixels_supervise_only_the_background(trainer):
    """With every pixel marked sky the foreground heads get no gradient; the background MLP does."""
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    sample, batch = pipeline.datamanager.next_train(3)
    sample.target.sky_masks = torch.ones_like(sample.target.sky_masks)
    trainer.optimizers.zero_grad_all()
    losses, _ = pipeline.sample_loss(sample, batch, step=1)  # step 1: no entropy term
    assert float(losses["rgb_loss"].detach()) == 0.0 and float(losses["sky_loss"].detach()) > 0
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    fg = [n for n in grads if n.startswith(("predictor.color_head", "predictor.opacity_head"))]
    assert fg and all(grads[n] is None or grads[n].abs().max() == 0 for n in fg)
    bg = [n for n in grads if n.startswith("predictor.background")]
    assert any(grads[n] is not None and grads[n].abs().max() > 0 for n in bg)
    trainer.optimizers.zero_grad_all()


def test_sky_region_metrics():
    from evolsplat_ns.model.metrics import masked_region_metrics

    gt = torch.zeros(16, 16, 3)
    pred = gt.clone()
    sky = torch.zeros(16, 16, dtype=torch.bool)
    sky[:4] = True
    pred[:4] = 0.1  # error only in the sky
    m = masked_region_metrics(pred, gt, sky, "sky", "non_sky")
    assert m["psnr_sky"] == pytest.approx(20.0, abs=1e-4) and m["psnr_non_sky"] == pytest.approx(100.0)
    assert m["ssim_non_sky"] > m["ssim_sky"]  # (the SSIM window straddles the border: not exactly 1)
    assert set(masked_region_metrics(pred, gt, torch.zeros_like(sky), "sky", "non_sky")) == {"psnr_non_sky",
                                                                                            "ssim_non_sky"}


def test_dome_colours_from_sky_pixels_only():
    """With ``sky_only`` a dome point in front of a building takes the nearest sky colour, and
    unseen dome points continue the sky (not the images' grey mean)."""
    from evolsplat_ns.data.types import Views
    from evolsplat_ns.model.background import first_view_colors

    H, W = 20, 20
    image = torch.zeros(1, H, W, 3)
    image[:, :10] = torch.tensor([0.3, 0.5, 0.9])  # sky above
    image[:, 10:] = torch.tensor([0.6, 0.2, 0.1])  # a facade below
    sky = torch.zeros(1, H, W, dtype=torch.bool)
    sky[:, :10] = True
    K = torch.tensor([[[20.0, 0, 10], [0, 20.0, 10], [0, 0, 1]]])
    views = Views(images=image, intrinsics=K, camtoworlds=torch.eye(4)[None], frame_ids=torch.tensor([0]),
                  cam_ids=torch.tensor([0]), sky_masks=sky)
    # OpenCV camera at the origin looking along +z: y < 0 is up in the image.
    points = torch.tensor([[0.0, -2.5, 10.0], [0.0, 2.5, 10.0], [0.0, -40.0, 10.0]])  # sky, facade, above view
    rgb, seen = first_view_colors(points, views, sky_only=False)
    assert seen.tolist() == [True, True, False]
    torch.testing.assert_close(rgb[1], image[0, 15, 10])
    torch.testing.assert_close(rgb[2], image[0, :10, 10][0])  # nearest seen: the sky point, not the mean
    rgb, seen = first_view_colors(points, views, sky_only=True)
    assert seen.tolist() == [True, False, False]
    torch.testing.assert_close(rgb[1], image[0, 5, 10])
