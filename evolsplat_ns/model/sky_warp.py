"""The sky at infinity, warped from the source views: a background with no depth and no learning.

A point at infinity in direction ``d`` (segment frame) projects into a source camera at
``K_s R_s^T d`` (its translation drops out), so a target pixel's sky colour is the source image at
that pixel: for each source a rotation-only homography ``K_s R_s^T R_t K_t^-1``. The nearest-source
baseline (:mod:`evolsplat_ns.inference.reprojection`) reaches far higher sky PSNR than the dome of
Gaussians (:mod:`evolsplat_ns.model.background`) this way; ``background_source "sources"``
(:class:`evolsplat_ns.model.predictor.PredictorConfig`) composites it behind the foreground.

Blending over sources: each source's weight is ``exp((cos - 1) / tau)``, ``cos`` the cosine between
the target ray and the source's optical axis (+z), times its coverage (sky mask, image border
feather). At infinity every source shows the same sky, so what differs is the camera: the source
looking most nearly along a ray is the target's own rig camera for most of its pixels (the same
exposure and white balance), and seams between cameras fall midway between their axes, far from
each image's border, where sky masks and the pinhole model are least reliable. A cosine (not an
angle) is flat near the axis: frames of one camera a few degrees apart average (their sky agrees,
averaging lowers noise) while cameras 45 degrees apart meet in a seam a few degrees wide.

Frames: cameras OpenCV camera-to-segment (x right, y down, z forward); pixel ``(i, j)`` covers
``[i, i+1) x [j, j+1)`` (centre at +0.5), ``grid_sample(align_corners=False)``'s convention
(:func:`evolsplat_ns.model.projector.to_grid`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evolsplat_ns.data.types import Views
from evolsplat_ns.model.precision import full_precision
from evolsplat_ns.model.projector import to_grid

DIRECTION_TAU = 0.02
"""Temperature of the source weights, in cosine units: two sources 45 degrees apart blend over
about +-3 degrees around the midway ray; sources 2 degrees apart near the axis near-equally."""
BORDER_FEATHER = 0.02
"""Width of the ramp (fraction of the smaller image side, at least 1 px) over which a source's
weight falls to 0 at its image border: seams between sources are soft, not a pixel step."""


def pinhole_inverse(K: torch.Tensor) -> torch.Tensor:
    """Inverse [..., 3, 3] of upper-triangular pinhole intrinsics ``K`` [..., 3, 3] in closed form
    (``torch.linalg.inv`` checks for singularity on the host: a device sync)."""
    fx, s, cx = K[..., 0, 0], K[..., 0, 1], K[..., 0, 2]
    fy, cy = K[..., 1, 1], K[..., 1, 2]
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [
        torch.stack([1 / fx, -s / (fx * fy), (s * cy - cx * fy) / (fx * fy)], dim=-1),
        torch.stack([zero, 1 / fy, -cy / fy], dim=-1),
        torch.stack([zero, zero, one], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def pixel_rays(K: torch.Tensor, c2w: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, 3] unit ray directions (segment frame) through every pixel centre of the camera
    ``K`` [3, 3], ``c2w`` [4, 4] (OpenCV camera-to-segment)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=K.device, dtype=K.dtype) + 0.5,
                            torch.arange(width, device=K.device, dtype=K.dtype) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)
    d = pix @ (c2w[:3, :3] @ pinhole_inverse(K)).T
    return d / d.norm(dim=-1, keepdim=True)


@torch.no_grad()
def warp_views(sources: Views, target_c2w: torch.Tensor, target_K: torch.Tensor, width: int,
               height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`warp_at_infinity` of ``sources`` (their sky pixels only when they carry sky masks)
    into the target ``target_c2w`` [4, 4] (OpenCV camera-to-segment), ``target_K`` [3, 3]."""
    return warp_at_infinity(sources.images, sources.intrinsics, sources.camtoworlds, target_c2w, target_K,
                            width, height, sources.sky_masks)


def warp_at_infinity(source_images: torch.Tensor, source_K: torch.Tensor, source_c2w: torch.Tensor,
                     target_c2w: torch.Tensor, target_K: torch.Tensor, width: int, height: int,
                     source_sky: torch.Tensor | None = None,
                     tau: float = DIRECTION_TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """The sources' images at infinity seen from a target camera (see the module doc).

    Args:
        source_images: [S, Hs, Ws, 3] RGB of the sources.
        source_K: [S, 3, 3] their intrinsics (pixels of those images).
        source_c2w: [S, 4, 4] OpenCV camera-to-segment (only the rotation is read).
        target_c2w: [4, 4] OpenCV camera-to-segment of the target; target_K: [3, 3].
        width, height: target image size.
        source_sky: optional [S, Hs, Ws] bool sky masks: only sky pixels are warped, each source's
            colour is the mask-weighted mean of its bilinear taps (a facade next to the sky does
            not bleed into it), its coverage the bilinear mask.
        tau: temperature of the direction weights (cosine units).
    Returns:
        rgb [H, W, 3] (0 where no source covers the pixel) and weight [H, W] in [0, 1]: how much
        some source covers the pixel (1 inside a source's sky, ramping to 0 over ``BORDER_FEATHER``
        at its image border and across its sky-mask edge; the largest over sources).
        fp32, fully on the device (no host sync); no gradient to the images is needed or kept apart.
    """
    return warp_stack_at_infinity(source_stack(source_images, source_sky), source_K, source_c2w, target_c2w,
                                  target_K, width, height, tau)


def source_stack(source_images: torch.Tensor, source_sky: torch.Tensor | None = None) -> torch.Tensor:
    """[S, 4, Hs, Ws] fp32 (channels first, contiguous) what :func:`warp_stack_at_infinity` samples:
    the sources' RGB [S, Hs, Ws, 3] premultiplied by their sky masks [S, Hs, Ws] (or 1), then the
    masks (the coverage channel; zero padding makes it 0 past the border). Target-independent: a
    caller warping the same sources into many cameras builds it once."""
    with full_precision(source_images.device):
        images = source_images.float()
        mask = (torch.ones_like(images[..., 0]) if source_sky is None
                else source_sky.to(device=images.device, dtype=images.dtype))
        return torch.cat([images * mask[..., None], mask[..., None]], dim=-1).permute(0, 3, 1, 2).contiguous()


def warp_stack_at_infinity(stack: torch.Tensor, source_K: torch.Tensor, source_c2w: torch.Tensor,
                           target_c2w: torch.Tensor, target_K: torch.Tensor, width: int, height: int,
                           tau: float = DIRECTION_TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`warp_at_infinity` from the sources' :func:`source_stack` ``stack`` [S, 4, Hs, Ws]."""
    device = stack.device
    with full_precision(device):
        Ks, c2w_s = source_K.to(device).float(), source_c2w.to(device).float()
        rays = pixel_rays(target_K.to(device).float(), target_c2w.to(device).float(), width, height)
        hs, ws = stack.shape[2:]
        # Source camera coordinates of the rays: R_s^T d, then the pixel at infinity K_s R_s^T d.
        cam = torch.einsum("hwc,sck->shwk", rays, c2w_s[:, :3, :3])  # [S, H, W, 3]
        z = cam[..., 2]
        pix = cam @ Ks.transpose(-1, -2)[:, None]
        uv = pix[..., :2] / z.clamp(min=1e-6)[..., None]
        # Channels first throughout: every per-pixel op below reads contiguous planes.
        taps = F.grid_sample(stack, to_grid(uv, hs, ws), mode="bilinear", padding_mode="zeros",
                             align_corners=False)  # [S, 4, H, W]
        cover = taps[:, 3]
        colour = taps[:, :3] / cover.clamp(min=1e-6)[:, None]
        feather = max(1.0, BORDER_FEATHER * min(hs, ws))
        edge = torch.minimum(torch.minimum(uv[..., 0], ws - uv[..., 0]), torch.minimum(uv[..., 1], hs - uv[..., 1]))
        # masked_fill, not torch.where with a Python scalar: that copies the scalar to the device,
        # which a CUDA-graph capture refuses (utils/cuda_graphs.py).
        cover = (cover * (edge / feather).clamp(0.0, 1.0)).masked_fill(z <= 1e-6, 0.0)
        # z is the cosine to the source's axis (unit rays, R_s a rotation). Logits shifted by their
        # largest covered value, so a pixel only far-off-axis sources see does not underflow.
        logit = ((z - 1.0) / tau).masked_fill(cover <= 0, float("-inf"))
        top = logit.max(dim=0).values
        w = cover * torch.exp(logit - top.masked_fill(~torch.isfinite(top), 0.0))
        rgb = (w[:, None] * colour).sum(dim=0) / w.sum(dim=0).clamp(min=1e-12)  # [3, H, W]
        weight = cover.max(dim=0).values
        rgb = rgb.masked_fill(weight <= 0, 0.0).permute(1, 2, 0).contiguous()
        return rgb, weight
