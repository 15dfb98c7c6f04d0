"""Photometric and regularisation losses of EVolSplat.

Photometric losses are plugins (entry-point group ``evolsplat_ns.losses``, chosen by the model's
``rgb_loss`` setting) with the signature ``loss(pred, gt, ssim_lambda) -> scalar`` for images
[H, W, 3] in [0, 1]; the built-ins ``l1_ssim`` and ``l1`` register through that same group.
"""

from __future__ import annotations

import torch
from pytorch_msssim import ssim


def ssim_map_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """1 - SSIM for images [H, W, 3] in [0, 1] (11x11 Gaussian window, as 3DGS)."""
    p, g = pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]
    return 1.0 - ssim(p, g, data_range=1.0, size_average=True, win_size=_win(pred))


def _win(img: torch.Tensor) -> int:
    """SSIM window: 11 unless the image is too small for it (tiny test images)."""
    w = min(11, min(img.shape[0], img.shape[1]))
    return w if w % 2 == 1 else w - 1


def l1_ssim_loss(pred: torch.Tensor, gt: torch.Tensor, ssim_lambda: float = 0.2) -> torch.Tensor:
    """(1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM); images [H, W, 3] in [0, 1]."""
    l1 = l1_loss(pred, gt)
    if ssim_lambda == 0:
        return l1
    return (1.0 - ssim_lambda) * l1 + ssim_lambda * ssim_map_loss(pred, gt)


def l1_loss(pred: torch.Tensor, gt: torch.Tensor, ssim_lambda: float = 0.0) -> torch.Tensor:
    """Mean absolute error of images [H, W, 3]; ``ssim_lambda`` is accepted and ignored."""
    return (pred - gt).abs().mean()


def entropy_loss(accumulation: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary entropy of the accumulated opacity [..., 1]: pushes pixels to fully opaque or empty."""
    a = accumulation.clamp(eps, 1 - eps)
    return -(a * a.log() + (1 - a) * (1 - a).log()).mean()
