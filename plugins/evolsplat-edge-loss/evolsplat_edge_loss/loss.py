"""L1 plus an edge term: the L1 distance between the images' finite-difference gradients.

Sharp edges (lane marks, facade borders) carry little L1 weight because they cover few pixels; the
gradient term weights them directly, so a blurry prediction pays for its soft edges.

The function follows evolsplat-ns's photometric-loss contract (``docs/plugins.md``, group
``evolsplat_ns.losses``): ``loss(pred, gt, ssim_lambda) -> scalar`` for images [H, W, 3] in [0, 1].
"""

from __future__ import annotations

import torch

EDGE_WEIGHT = 0.5
"""Weight of the gradient term relative to the plain L1 term."""


def image_gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of ``img`` [H, W, C]: (d/dx [H, W-1, C], d/dy [H-1, W, C])."""
    return img[:, 1:] - img[:, :-1], img[1:] - img[:-1]


def l1_edge_loss(pred: torch.Tensor, gt: torch.Tensor, ssim_lambda: float = 0.0) -> torch.Tensor:
    """``|pred - gt|`` + ``EDGE_WEIGHT`` * ``|grad pred - grad gt|`` (means), images [H, W, 3] in [0, 1].

    ``ssim_lambda`` is part of the contract and unused here (this loss has no SSIM term).
    """
    (pdx, pdy), (gdx, gdy) = image_gradients(pred), image_gradients(gt)
    edge = 0.5 * ((pdx - gdx).abs().mean() + (pdy - gdy).abs().mean())
    return (pred - gt).abs().mean() + EDGE_WEIGHT * edge
