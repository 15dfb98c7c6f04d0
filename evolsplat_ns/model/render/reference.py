"""Pure-PyTorch 3D Gaussian rasteriser (any device, autograd), matching ``gsplat.rasterization``.

Projection and SH evaluation reuse gsplat 1.4.0's own PyTorch reference functions
(``gsplat/cuda/_torch_impl.py``); this module adds what gsplat only has as CUDA kernels: tile
binning and front-to-back alpha compositing. It follows gsplat's CUDA rasteriser exactly:

- pixel (x, y) is sampled at its centre (x + 0.5, y + 0.5);
- the 2D covariance is dilated by ``eps2d`` = 0.3 px^2 (low-pass filter), radius = 3 sigma;
- a Gaussian only reaches the 16x16 tiles overlapped by its radius box (so pixels just outside the
  box but inside a covered tile still see it, as on the GPU);
- per pixel, Gaussians are taken in increasing camera depth, ``alpha = min(0.999, o * exp(-s))``,
  ``alpha < 1/255`` (or ``s < 0``) is skipped, and compositing stops *before* the Gaussian that
  would bring the transmittance to <= 1e-4.

Memory is bounded by compositing groups of tiles of similar Gaussian count, at most
``chunk_elems`` (pixel, Gaussian) pairs at a time; when several chunks are needed under autograd,
each chunk is recomputed in backward (activation checkpointing) instead of keeping its
intermediates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint

TILE_SIZE = 16
EPS2D = 0.3
ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4
# ~8 MB per float32 [pixels, Gaussians] temporary; about a dozen of them live at once.
DEFAULT_CHUNK_ELEMS = 1 << 21


@dataclass
class _TileBins:
    """Gaussians binned into image tiles, depth-sorted within each tile.

    ``gauss_ids`` [M] index the flattened [C * N] camera-Gaussian pairs, grouped by tile and in
    increasing depth inside a group; tile ``i`` owns ``gauss_ids[starts[i] : starts[i] + counts[i]]``
    and sits at ``tile_keys[i] = camera * tiles_per_image + row * tiles_x + col``.
    """

    gauss_ids: Tensor
    tile_keys: Tensor
    starts: Tensor
    counts: Tensor


def _bin_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, tiles_x: int, tiles_y: int
) -> _TileBins:
    """Tile/Gaussian intersections, as gsplat's ``isect_tiles`` + ``isect_offset_encode``.

    Vectorised rather than calling ``_torch_impl._isect_tiles``, which loops in Python over every
    Gaussian. Args: means2d [C, N, 2] pixels, radii [C, N] int, depths [C, N] camera z.
    """
    C, N = radii.shape
    device = means2d.device
    centre = means2d.detach().float() / TILE_SIZE
    rad = (radii.float() / TILE_SIZE)[..., None]
    limits = torch.tensor([tiles_x, tiles_y], device=device)
    lo = torch.minimum(torch.floor(centre - rad).clamp(min=0).long(), limits)
    hi = torch.minimum(torch.ceil(centre + rad).clamp(min=0).long(), limits)
    extent = (hi - lo).clamp(min=0)
    n_tiles = (extent[..., 0] * extent[..., 1] * (radii > 0)).flatten()  # [C*N]

    gauss = torch.repeat_interleave(torch.arange(C * N, device=device), n_tiles)
    first = torch.cumsum(n_tiles, 0) - n_tiles
    local = torch.arange(gauss.numel(), device=device) - first[gauss]
    width = extent[..., 0].flatten()[gauss]
    col = lo[..., 0].flatten()[gauss] + local % width
    row = lo[..., 1].flatten()[gauss] + local // width
    cam = gauss // N
    tile_key = (cam * tiles_y + row) * tiles_x + col

    # Stable depth ranks break depth ties by Gaussian index, like gsplat's stable radix sort.
    depth_rank = torch.empty(C * N, dtype=torch.long, device=device)
    depth_rank[torch.argsort(depths.detach().flatten(), stable=True)] = torch.arange(
        C * N, device=device
    )
    order = torch.argsort(tile_key * (C * N) + depth_rank[gauss])
    tile_key = tile_key[order]
    keys, counts = torch.unique_consecutive(tile_key, return_counts=True)
    return _TileBins(gauss[order], keys, torch.cumsum(counts, 0) - counts, counts)


def _plan_chunks(counts: Tensor, chunk_elems: int) -> list[Tensor]:
    """Group tile indices (by ascending Gaussian count) so that tiles x pixels x max count fits
    ``chunk_elems``; a single tile larger than that gets a chunk of its own."""
    order = torch.argsort(counts.cpu(), stable=True)
    sorted_counts = counts.cpu()[order].tolist()
    pixels = TILE_SIZE * TILE_SIZE
    chunks, begin = [], 0
    for i, k in enumerate(sorted_counts):
        if i > begin and (i - begin + 1) * pixels * k > chunk_elems:
            chunks.append(order[begin:i])
            begin = i
    if sorted_counts:
        chunks.append(order[begin:])
    return [c.to(counts.device) for c in chunks]


def _tile_pixels(tile_keys: Tensor, tiles_x: int, tiles_y: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pixels of the given tiles: x, y [T, 256] (integer pixel indices, as float) and
    camera index [T]."""
    cam = tile_keys // (tiles_x * tiles_y)
    in_image = tile_keys % (tiles_x * tiles_y)
    offs = torch.arange(TILE_SIZE, device=tile_keys.device)
    px = ((in_image % tiles_x) * TILE_SIZE)[:, None, None] + offs[None, None, :]
    py = ((in_image // tiles_x) * TILE_SIZE)[:, None, None] + offs[None, :, None]
    px, py = torch.broadcast_tensors(px, py)
    return px.flatten(1), py.flatten(1), cam


def _composite(
    px: Tensor,
    py: Tensor,
    gauss: Tensor,
    valid: Tensor,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of depth-sorted Gaussians over the pixels of a group of tiles.

    Args:
        px, py: [T, P] pixel indices (x right, y down); sampled at the pixel centre.
        gauss: [T, K] depth-sorted indices into the flattened [C * N] tensors below; padding
            entries are masked out by ``valid`` [T, K].
        means2d: [C*N, 2] pixels. conics: [C*N, 3] upper triangle of the inverse 2D covariance.
        opacities: [C*N]. features: [C*N, D] colours (+ depth channel).
    Returns:
        features [T, P, D] and accumulated alpha [T, P], without background.
    """
    mean = means2d[gauss]
    conic = conics[gauss]
    dx = (px + 0.5)[:, :, None] - mean[:, None, :, 0]
    dy = (py + 0.5)[:, :, None] - mean[:, None, :, 1]
    sigma = 0.5 * (
        conic[:, None, :, 0] * dx * dx + conic[:, None, :, 2] * dy * dy
    ) + conic[:, None, :, 1] * dx * dy
    alpha = (opacities[gauss][:, None, :] * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
    used = (sigma >= 0) & (alpha >= ALPHA_MIN) & valid[:, None, :]
    alpha = torch.where(used, alpha, torch.zeros_like(alpha))

    trans_after = torch.cumprod(1.0 - alpha, dim=-1)
    trans_before = torch.cat([torch.ones_like(alpha[..., :1]), trans_after[..., :-1]], dim=-1)
    # Transmittance only falls, so "every Gaussian so far kept T above T_MIN" is a per-entry test.
    weights = alpha * trans_before * (trans_after > T_MIN)
    return torch.bmm(weights, features[gauss]), weights.sum(-1)


def _rasterize_features(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    chunk_elems: int,
) -> tuple[Tensor, Tensor]:
    """Composite per-camera Gaussians into images.

    Args: means2d [C, N, 2] pixels, conics [C, N, 3], opacities [C, N], features [C, N, D],
        radii [C, N] (0 = culled), depths [C, N] OpenCV camera z (sort key).
    Returns: features [C, H, W, D] and alpha [C, H, W, 1], without background.
    """
    C, N, D = features.shape
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    bins = _bin_tiles(means2d, radii, depths, tiles_x, tiles_y)
    flat = (means2d.reshape(C * N, 2), conics.reshape(C * N, 3), opacities.reshape(C * N),
            features.reshape(C * N, D))
    chunks = _plan_chunks(bins.counts, chunk_elems)
    recompute = torch.is_grad_enabled() and len(chunks) > 1

    pixel_ids, values = [], []
    for tiles in chunks:
        kmax = int(bins.counts[tiles].max())
        slot = torch.arange(kmax, device=means2d.device)
        valid = slot[None, :] < bins.counts[tiles, None]
        gauss = bins.gauss_ids[(bins.starts[tiles, None] + slot).clamp(max=bins.gauss_ids.numel() - 1)]
        gauss = torch.where(valid, gauss, torch.zeros_like(gauss))
        px, py, cam = _tile_pixels(bins.tile_keys[tiles], tiles_x, tiles_y)
        args = (px.to(means2d.dtype), py.to(means2d.dtype), gauss, valid, *flat)
        feat, alpha = checkpoint(_composite, *args, use_reentrant=False) if recompute else _composite(*args)
        inside = (px < width) & (py < height)
        pixel_ids.append(((cam[:, None] * height + py) * width + px)[inside])
        values.append(torch.cat([feat, alpha[..., None]], dim=-1)[inside])

    image = features.new_zeros(C * height * width, D + 1)
    if pixel_ids:
        image = image.index_copy(0, torch.cat(pixel_ids), torch.cat(values))
    image = image.reshape(C, height, width, D + 1)
    return image[..., :D], image[..., D:]


def _evaluate_colors(
    colors: Tensor, means: Tensor, viewmats: Tensor, sh_degree: int | None
) -> Tensor:
    """Per-camera RGB [C, N, 3] from RGB [N, 3] / [C, N, 3] or SH [N, K, 3] / [C, N, K, 3].

    SH are evaluated along the world-frame direction camera centre -> Gaussian and offset by 0.5,
    clamped at 0, as gsplat does. viewmats [C, 4, 4] are world-to-camera (OpenCV axes).
    """
    C, N = viewmats.shape[0], means.shape[0]
    if sh_degree is None:
        return colors.expand(C, N, colors.shape[-1])
    cam_centres = torch.linalg.inv(viewmats)[:, :3, 3]
    dirs = means[None, :, :] - cam_centres[:, None, :]
    shs = colors.expand(C, N, *colors.shape[-2:])
    return (_spherical_harmonics(sh_degree, dirs, shs) + 0.5).clamp(min=0.0)


def rasterize_reference(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[Tensor, Tensor, dict]:
    """``gsplat.rasterization(..., render_mode="RGB+ED")`` in PyTorch; same inputs and outputs.

    Args:
        means: [N, 3] world frame. quats: [N, 4] wxyz, unnormalised ok. scales: [N, 3] linear.
        opacities: [N] in [0, 1]. colors: [N, 3] / [C, N, 3] RGB, or SH [N, K, 3] / [C, N, K, 3]
            when ``sh_degree`` is set.
        viewmats: [C, 4, 4] world-to-camera, OpenCV axes (x right, y down, z forward).
        Ks: [C, 3, 3] pinhole intrinsics in pixels. backgrounds: [C, 3] or None.
        chunk_elems: (pixel, Gaussian) pairs composited at once; bounds memory.
    Returns:
        colors [C, H, W, 4] (RGB, then expected camera-z depth normalised by alpha),
        alphas [C, H, W, 1], and meta with radii [C, N] int32, means2d [C, N, 2], depths [C, N],
        conics [C, N, 3].
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=EPS2D,
        near_plane=near_plane, far_plane=far_plane,
    )
    rgb = _evaluate_colors(colors, means, viewmats, sh_degree)
    features = torch.cat([rgb, depths[..., None]], dim=-1)
    C, N = radii.shape
    feat, alpha = _rasterize_features(
        means2d, conics, opacities.expand(C, N), features, radii, depths,
        width, height, chunk_elems,
    )
    rgb_img, depth_acc = feat[..., :3], feat[..., 3:]
    if backgrounds is not None:
        rgb_img = rgb_img + (1.0 - alpha) * backgrounds[:, None, None, :]
    out = torch.cat([rgb_img, depth_acc / alpha.clamp(min=1e-10)], dim=-1)
    meta = {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics}
    return out, alpha, meta
