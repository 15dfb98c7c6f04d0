"""Perceptual metrics are offline and honest: stlpips from its shipped weights, under its own name."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model import metrics


def _images():
    g = torch.Generator().manual_seed(0)
    # Random 8-pixel blocks (sharp edges), its 1-pixel shift, a 7-pixel box blur of it, and noise.
    blocks = torch.rand(3, 8, 12, generator=g)
    img = torch.nn.functional.interpolate(blocks[None], scale_factor=8, mode="nearest")[0].permute(1, 2, 0)
    blurred = torch.nn.functional.avg_pool2d(img.permute(2, 0, 1)[None], 7, 1, 3, count_include_pad=False)[0].permute(1, 2, 0)
    noise = torch.rand(img.shape, generator=g)
    return img, torch.roll(img, 1, dims=1), blurred, noise


def test_stlpips_is_reported_under_its_own_name_from_shipped_weights(monkeypatch):
    ok, reason = metrics.stlpips_status()
    if not ok:
        pytest.skip(reason)
    # Offline: no download is attempted (torch.hub would be the route).
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    img, shifted, blurred, noise = _images()
    same, shift, blur, other = (float(metrics.stlpips_value(img, b)) for b in (img, shifted, blurred, noise))
    assert same == pytest.approx(0.0, abs=1e-6)
    assert 0 < shift < blur < other <= 1.5, (shift, blur, other)
    row = metrics.image_metrics(img, blurred)
    assert row["stlpips"] == pytest.approx(blur, rel=1e-5)
    assert ("lpips" in row) == metrics.lpips_status()[0], "stlpips never stands in for lpips"


def test_perceptual_status_says_why_a_metric_is_missing():
    status = metrics.perceptual_status()
    for name in ("lpips", "stlpips"):
        assert isinstance(status[f"{name}_available"], bool)
        assert status[f"{name}_available"] or "unavailable" in status[f"{name}_note"]


def test_no_perceptual_metric_when_not_asked():
    img, _, blurred, _ = _images()
    assert set(metrics.image_metrics(img, blurred, lpips=False)) == {"psnr", "ssim"}
