"""Fast path: gsplat 1.4.0's fused CUDA rasteriser (``gsplat.rasterization``), CUDA tensors only."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def gsplat_cuda_available() -> bool:
    """True when CUDA is present and gsplat's compiled ops load (prebuilt or JIT-built)."""
    if not torch.cuda.is_available():
        return False
    try:
        from gsplat.cuda._backend import _C
    except Exception:  # a failed JIT build raises anything from OSError to RuntimeError
        return False
    return _C is not None


def _dense_radii(meta: dict, n_cameras: int, n_gaussians: int) -> Tensor:
    """Radii [C, N] int32 from gsplat's meta, scattering the packed [nnz] layout if used."""
    radii = meta["radii"]
    if meta.get("camera_ids") is None:
        return radii
    dense = radii.new_zeros(n_cameras, n_gaussians)
    dense[meta["camera_ids"], meta["gaussian_ids"]] = radii
    return dense


def rasterize_gsplat(
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
    packed: bool = False,
    render_mode: str = "RGB+ED",
) -> tuple[Tensor, Tensor, dict]:
    """``gsplat.rasterization(..., render_mode=render_mode)``; inputs as in
    :func:`evolsplat_ns.model.render.reference.rasterize_reference` (viewmats world-to-camera,
    OpenCV axes).

    Returns colors [C, H, W, 4] (RGB + expected depth; [C, H, W, D] for "RGB" with D-channel
    colours: gsplat pads unsupported channel counts itself), alphas [C, H, W, 1] and gsplat's meta,
    whose ``radii`` is made dense [C, N] even when ``packed`` (``means2d`` stays as gsplat gives it,
    [nnz, 2] when packed, so that its gradient can still be retained for densification).
    """
    from gsplat import rasterization

    out, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, sh_degree=sh_degree,
        backgrounds=backgrounds, packed=packed, render_mode=render_mode,
    )
    meta["radii"] = _dense_radii(meta, viewmats.shape[0], means.shape[0])
    return out, alpha, meta


def rasterize_blocks_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    blocks: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Each Gaussian drawn into its own camera only: row ``n`` into camera ``blocks[n]``.

    ``gsplat.rasterization``'s non-packed pipeline (classic mode, ``render_mode="RGB"``, its
    defaults) on gsplat's own ops, with one step added: the projected radii of every (camera,
    Gaussian) pair whose Gaussian belongs to another camera are set to 0, so the tile
    intersection leaves them out. C targets with their own Gaussians then cost one projection,
    one tile sort and one compositing kernel forward and backward instead of C of each.

    Args: means [N, 3], quats [N, 4], scales [N, 3] (linear), opacities [N], features [N, D] as
        :func:`rasterize_gsplat` takes them; ``blocks`` [N] long camera index of each row;
        viewmats [C, 4, 4] world-to-camera (OpenCV axes), Ks [C, 3, 3].
    Returns: features [C, H, W, D] and alphas [C, H, W, 1].
    """
    from gsplat import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels

    C = viewmats.shape[0]
    radii, means2d, depths, conics, _ = fully_fused_projection(
        means, None, quats, scales, viewmats, Ks, width, height, near_plane=near_plane, far_plane=far_plane)
    own = blocks[None, :] == torch.arange(C, device=blocks.device)[:, None]  # [C, N]
    radii = torch.where(own, radii, 0)
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height,
                                            n_cameras=C)
    isect_offsets = isect_offset_encode(isect_ids, C, tile_width, tile_height)
    # Per camera the same rows; those of other cameras are in no tile list, so never read.
    return rasterize_to_pixels(means2d, conics, features.expand(C, -1, -1), opacities.expand(C, -1), width,
                               height, tile_size, isect_offsets, flatten_ids)


def evaluate_sh_gsplat(sh_degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """RGB [..., 3] of SH ``coeffs`` [..., K, 3] along ``dirs`` [..., 3] with gsplat's CUDA kernel,
    offset by 0.5 and clamped at 0 as ``gsplat.rasterization`` does."""
    from gsplat import spherical_harmonics

    return torch.clamp_min(spherical_harmonics(sh_degree, dirs, coeffs) + 0.5, 0.0)
