"""Pure-PyTorch 3D Gaussian rasteriser (any device, autograd), matching ``gsplat.rasterization``.

Projection and SH evaluation reuse gsplat 1.4.0's own PyTorch reference functions
(``gsplat/cuda/_torch_impl.py``); this module adds what gsplat only has as CUDA kernels: tile
binning and front-to-back alpha compositing. It follows gsplat's CUDA rasteriser exactly:

- pixel (x, y) is sampled at its centre (x + 0.5, y + 0.5);
- the 2D covariance is dilated by ``eps2d`` = 0.3 px^2 (low-pass filter), radius = 3 sigma;
- a Gaussian only reaches the 16x16 tiles overlapped by its radius box (so pixels just outside the
  box but inside a covered tile still see it, as on the GPU);
- per pixel, Gaussians are taken in increasing camera depth, ``alpha = min(0.999, o * exp(-s))``,
  ``alpha < 1/255`` is skipped, and compositing stops *before* the Gaussian that
  would bring the transmittance to <= 1e-4.

Memory is bounded by compositing groups of tiles of similar Gaussian count, at most
``chunk_elems`` (pixel, Gaussian) pairs at a time; when several chunks are needed under autograd,
each chunk is recomputed in backward (activation checkpointing) instead of keeping its
intermediates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gsplat
import torch
from torch import Tensor

GSPLAT_TESTED = ((1, 4), (1, 5))
"""[lowest, first untested) gsplat (major, minor) whose private PyTorch reference we import."""


def _gsplat_version() -> tuple[int, int]:
    return tuple(int(x) for x in gsplat.__version__.split(".")[:2])  # type: ignore[return-value]


if not GSPLAT_TESTED[0] <= _gsplat_version() < GSPLAT_TESTED[1]:
    raise ImportError(
        f"evolsplat_ns' PyTorch rasteriser reuses gsplat 1.4's private functions in gsplat.cuda._torch_impl, "
        f"but gsplat {gsplat.__version__} is installed (they moved in 1.5): pip install 'gsplat>=1.4.0,<1.5' "
        "(what nerfstudio 1.1.5 pins too)")
from gsplat.cuda._torch_impl import (  # noqa: E402  (after the version check that explains a failure)
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)
from torch.utils.checkpoint import checkpoint

TILE_SIZE = 16
EPS2D = 0.3
ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4
SIGMA_CAP = 60.0
LOG_T_FLOOR = math.log(T_MIN) - 10.0
# ~4 MB per float32 [pixels, Gaussians] temporary; about twenty of them live at once.
DEFAULT_CHUNK_ELEMS = 1 << 20


@dataclass
class _TileBins:
    """Gaussians binned into image tiles, depth-sorted within each tile.

    ``gauss_ids`` [M] index the flattened [C * N] camera-Gaussian pairs, grouped by tile and in
    increasing depth inside a group; tile ``i`` owns ``gauss_ids[starts[i]:][:counts[i]]`` and
    sits at ``tile_keys[i] = camera * tiles_per_image + row * tiles_x + col``.
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
    """Pixel indices x, y [T, 256] (x right, y down, row-major inside a tile) and tile centres
    [T, 2] in pixels, for the tiles ``tile_keys`` [T] (see :class:`_TileBins`)."""
    in_image = tile_keys % (tiles_x * tiles_y)
    corner = torch.stack([in_image % tiles_x, in_image // tiles_x], dim=-1) * TILE_SIZE  # [T, 2]
    offs = torch.arange(TILE_SIZE, device=tile_keys.device)
    px = (corner[:, 0, None, None] + offs[None, None, :]).expand(-1, TILE_SIZE, -1)
    py = (corner[:, 1, None, None] + offs[None, :, None]).expand(-1, -1, TILE_SIZE)
    return px.flatten(1), py.flatten(1), corner + TILE_SIZE / 2


def _quadratic_basis(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[1, u, v, u^2, v^2, uv] [256, 6] at the pixel centres of a tile, (u, v) relative to the
    tile centre; the same for every tile."""
    offs = torch.arange(TILE_SIZE, dtype=dtype, device=device) + 0.5 - TILE_SIZE / 2
    v, u = torch.meshgrid(offs, offs, indexing="ij")
    u, v = u.flatten(), v.flatten()
    return torch.stack([torch.ones_like(u), u, v, u * u, v * v, u * v], dim=-1)


def _sigma_coefficients(mean: Tensor, conic: Tensor) -> Tensor:
    """Coefficients [T, K, 6] of the Mahalanobis half-distance
    ``0.5 a du^2 + 0.5 c dv^2 + b du dv`` (du = u - mean_u) as a polynomial in the
    :func:`_quadratic_basis`, for means [T, K, 2] relative to the tile centre and conics
    (a, b, c) [T, K, 3]. Centring on the tile keeps the terms small: float32 rounding ~1e-6."""
    mu, mv = mean.unbind(-1)
    a, b, c = conic.unbind(-1)
    return torch.stack(
        [
            0.5 * a * mu * mu + 0.5 * c * mv * mv + b * mu * mv,
            -(a * mu + b * mv),
            -(c * mv + b * mu),
            0.5 * a,
            0.5 * c,
            b,
        ],
        dim=-1,
    )


def _composite(
    tile_centres: Tensor,
    gauss: Tensor,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
) -> Tensor:
    """Front-to-back compositing of depth-sorted Gaussians over the 256 pixels of each tile.

    Args:
        tile_centres: [T, 2] pixels.
        gauss: [T, K] depth-sorted rows of the flattened tensors below; padding points at a
            Gaussian of opacity 0.
        means2d: [G, 2] pixels. conics: [G, 3] upper triangle of the inverse 2D covariance.
        opacities: [G]. features: [G, F] colours, depth and a last column of ones (-> alpha).
    Returns:
        [T, 256, F] alpha-weighted feature sums (no background).
    """
    mean = means2d[gauss] - tile_centres[:, None, :]
    coeff = _sigma_coefficients(mean, conics[gauss])
    sigma = torch.matmul(_quadratic_basis(mean.dtype, mean.device), coeff.transpose(1, 2))
    # The dilated conic is positive definite, so sigma >= 0 and gsplat's "skip sigma < 0" never
    # fires there; here the polynomial form rounds to tiny negatives at the mean, hence the floor.
    # The cap keeps exp(-sigma) out of float32 denormals (very slow on CPU); such alphas are
    # below 1/255 and dropped anyway.
    alpha = opacities[gauss][:, None, :] * torch.exp(-sigma.clamp(min=0.0, max=SIGMA_CAP))
    alpha = alpha.clamp(max=ALPHA_MAX)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))

    # Log-space transmittance: a running product would sink into denormals behind opaque
    # Gaussians. Only entries with T_after > T_MIN are used, so flooring T_before is harmless.
    log_keep = torch.log1p(-alpha)
    log_after = torch.cumsum(log_keep, dim=-1)
    trans_before = torch.exp((log_after - log_keep).clamp(min=LOG_T_FLOOR))
    alive = log_after > math.log(T_MIN)
    weights = torch.where(alive, alpha * trans_before, torch.zeros_like(alpha))
    return torch.bmm(weights, features[gauss])


def _with_padding_row(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flatten [C, N, ...] to [C*N, ...] and append one invisible Gaussian (opacity 0) for the
    padding slots of the per-tile lists; a ones column is appended to features for alpha."""
    tensors = (means2d, conics, opacities[..., None], features)
    flat = [torch.cat([t.flatten(0, 1), t.new_zeros(1, t.shape[-1])]) for t in tensors]
    ones = flat[3].new_ones(flat[3].shape[0], 1)
    return flat[0], flat[1], flat[2][:, 0], torch.cat([flat[3], ones], dim=-1)


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
    flat = _with_padding_row(means2d, conics, opacities, features)
    padding_id = C * N
    chunks = _plan_chunks(bins.counts, chunk_elems)
    recompute = torch.is_grad_enabled() and len(chunks) > 1

    pixel_ids, values = [], []
    for tiles in chunks:
        slot = torch.arange(int(bins.counts[tiles].max()), device=means2d.device)
        valid = slot[None, :] < bins.counts[tiles, None]
        index = (bins.starts[tiles, None] + slot).clamp(max=bins.gauss_ids.numel() - 1)
        gauss = torch.where(valid, bins.gauss_ids[index], padding_id)
        px, py, centres = _tile_pixels(bins.tile_keys[tiles], tiles_x, tiles_y)
        args = (centres.to(means2d.dtype), gauss, *flat)
        out = checkpoint(_composite, *args, use_reentrant=False) if recompute else _composite(*args)
        inside = (px < width) & (py < height)
        cam = bins.tile_keys[tiles, None] // (tiles_x * tiles_y)
        pixel_ids.append(((cam * height + py) * width + px)[inside])
        values.append(out[inside])

    image = features.new_zeros(C * height * width, D + 1)
    if pixel_ids:
        image = image.index_copy(0, torch.cat(pixel_ids), torch.cat(values))
    image = image.reshape(C, height, width, D + 1)
    return image[..., :D], image[..., D:]


def evaluate_sh(sh_degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """RGB [..., 3] of SH ``coeffs`` [..., K, 3] along ``dirs`` [..., 3] (any length, world frame,
    camera centre -> Gaussian), offset by 0.5 and clamped at 0 as gsplat's rasterizer does."""
    return (_spherical_harmonics(sh_degree, dirs, coeffs) + 0.5).clamp(min=0.0)


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
    return evaluate_sh(sh_degree, dirs, colors.expand(C, N, *colors.shape[-2:]))


def _project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gsplat's PyTorch projection, one camera at a time: radii [C, N] int32, means2d [C, N, 2]
    pixels, depths [C, N] OpenCV camera z, conics [C, N, 3].

    Gaussians within ``near_plane`` of a camera's z = 0 plane are culled for that camera anyway;
    they are first moved (detached) to z = -1 there, because the projection divides by z and at
    z = 0 their zero gradient would come back as 0 * inf = NaN.
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    per_camera = []
    for viewmat, K in zip(viewmats, Ks):
        axis = viewmat[2, :3]  # camera z axis in world coordinates (row of world-to-camera)
        z = (means @ axis + viewmat[2, 3]).detach()
        behind = means.detach() - (z + 1.0)[:, None] * axis / axis.dot(axis)
        safe = torch.where((z.abs() < near_plane)[:, None], behind, means)
        radii, means2d, depths, conics, _ = _fully_fused_projection(
            safe, covars, viewmat[None], K[None], width, height, eps2d=EPS2D,
            near_plane=near_plane, far_plane=far_plane,
        )
        per_camera.append((radii, means2d, depths, conics))
    return tuple(torch.cat(parts) for parts in zip(*per_camera))


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
    render_mode: str = "RGB+ED",
) -> tuple[Tensor, Tensor, dict]:
    """``gsplat.rasterization(..., render_mode=render_mode)`` in PyTorch; same inputs and outputs.

    Args:
        means: [N, 3] world frame. quats: [N, 4] wxyz, unnormalised ok. scales: [N, 3] linear.
        opacities: [N] in [0, 1]. colors: [N, 3] / [C, N, 3] RGB, or SH [N, K, 3] / [C, N, K, 3]
            when ``sh_degree`` is set.
        viewmats: [C, 4, 4] world-to-camera, OpenCV axes (x right, y down, z forward).
        Ks: [C, 3, 3] pinhole intrinsics in pixels. backgrounds: [C, 3] or None.
        chunk_elems: (pixel, Gaussian) pairs composited at once; bounds memory.
        render_mode: "RGB+ED" (colours, then depth) or "RGB" (the colours alone; with
            ``sh_degree`` None they may have any number D of channels, [N, D] / [C, N, D]).
    Returns:
        colors [C, H, W, 4] (RGB, then expected camera-z depth normalised by alpha; [C, H, W, D]
        for "RGB"),
        alphas [C, H, W, 1], and meta with radii [C, N] int32, means2d [C, N, 2], depths [C, N],
        conics [C, N, 3].
    """
    radii, means2d, depths, conics = _project(
        means, quats, scales, viewmats, Ks, width, height, near_plane, far_plane
    )
    if render_mode not in ("RGB", "RGB+ED"):
        raise ValueError(f"rasterize_reference: render_mode {render_mode!r}, expected 'RGB' or 'RGB+ED'")
    rgb = _evaluate_colors(colors, means, viewmats, sh_degree)
    with_depth = render_mode == "RGB+ED"
    features = torch.cat([rgb, depths[..., None]], dim=-1) if with_depth else rgb
    C, N = radii.shape
    feat, alpha = _rasterize_features(
        means2d, conics, opacities.expand(C, N), features, radii, depths,
        width, height, chunk_elems,
    )
    D = rgb.shape[-1]
    rgb_img = feat[..., :D]
    if backgrounds is not None:
        rgb_img = rgb_img + (1.0 - alpha) * backgrounds[:, None, None, :]
    out = torch.cat([rgb_img, feat[..., D:] / alpha.clamp(min=1e-10)], dim=-1) if with_depth else rgb_img
    meta = {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics}
    return out, alpha, meta
