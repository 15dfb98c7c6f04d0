"""Photometric and regularisation losses of EVolSplat.

Photometric losses are plugins (entry-point group ``evolsplat_ns.losses``, chosen by the model's
``rgb_loss`` setting) with the signature ``loss(pred, gt, ssim_lambda) -> scalar`` for images
[H, W, 3] in [0, 1]; the built-ins ``l1_ssim`` and ``l1`` register through that same group.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim


def ssim_map_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """1 - SSIM for images [H, W, 3] in [0, 1] (11x11 Gaussian window, as 3DGS)."""
    return 1.0 - fused_ssim(pred, gt, _win(pred))


@functools.lru_cache(maxsize=16)
def _gauss_window(size: int, sigma: float, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """pytorch_msssim's 1-D Gaussian window [channels, 1, 1, size] on ``device``, made once (a
    fresh window per call is a host-to-device copy, i.e. a device sync, per target view)."""
    coords = torch.arange(size, dtype=torch.float) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).reshape(1, 1, 1, size).repeat(channels, 1, 1, 1).to(device=device, dtype=dtype)


def fused_ssim(pred: torch.Tensor, gt: torch.Tensor, win_size: int = 11, win_sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (data range 1) of images [H, W, C], the same function as ``pytorch_msssim.ssim``
    (valid separable Gaussian filtering, K = (0.01, 0.03)), with the five filtered maps (x, y, x^2,
    y^2, xy) filtered as one stacked tensor: two convolutions instead of ten, forward and backward."""
    h, w, c = pred.shape
    if min(h, w) < win_size:  # pytorch_msssim skips smoothing along short axes; keep its semantics
        return ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0,
                    size_average=True, win_size=win_size, win_sigma=win_sigma)
    x, y = pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]  # [1, C, H, W]
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    win = _gauss_window(win_size, win_sigma, 5 * c, maps.dtype, maps.device)
    maps = F.conv2d(F.conv2d(maps, win, groups=5 * c), win.transpose(2, 3), groups=5 * c)
    mu1, mu2, xx, yy, xy = maps.split(c, dim=1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    cs_map = (2 * (xy - mu1_mu2) + c2) / ((xx - mu1_sq) + (yy - mu2_sq) + c2)
    ssim_map = ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
    return ssim_map.flatten(2).mean(-1).mean()


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
