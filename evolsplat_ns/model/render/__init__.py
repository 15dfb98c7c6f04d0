"""Gaussian splatting renderer: one API over gsplat's CUDA rasteriser and a PyTorch reference.

:func:`rasterize` has the semantics of ``gsplat.rasterization`` (gsplat 1.4.0) with
``render_mode="RGB+ED"``. Backends:

- ``"gsplat"``: fused CUDA kernels; CUDA tensors only.
- ``"reference"``: pure PyTorch (:mod:`.reference`), any device, differentiable; for CPU runs and
  tests.
- ``"auto"``: the environment variable ``EVOLSPLAT_RENDERER`` if set, else gsplat when the inputs
  are on CUDA and gsplat's CUDA ops load, else the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor

import torch

from .gsplat_backend import evaluate_sh_gsplat, gsplat_cuda_available, rasterize_blocks_gsplat, rasterize_gsplat
from .reference import evaluate_sh as evaluate_sh_reference
from .reference import rasterize_reference
from .sh import C0, num_sh_bases, rgb_to_sh0, sh0_to_rgb

BACKEND_ENV_VAR = "EVOLSPLAT_RENDERER"
BACKENDS = ("auto", "gsplat", "reference")

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "C0",
    "RenderOutput",
    "evaluate_sh",
    "num_sh_bases",
    "rasterize",
    "rasterize_feature_blocks",
    "rasterize_features",
    "resolve_backend",
    "rgb_to_sh0",
    "sh0_to_rgb",
]


@dataclass
class RenderOutput:
    """Rendered images for C cameras of H x W pixels.

    rgb: [C, H, W, 3], background composited in.
    depth: [C, H, W, 1] expected depth along the OpenCV camera z axis (metres), i.e. the
        alpha-weighted depth divided by ``alpha`` (gsplat's "ED"); meaningless where alpha ~ 0.
    alpha: [C, H, W, 1] accumulated opacity.
    meta: ``backend`` (name used), ``radii`` [C, N] int (0 = culled), ``visible`` [C, N] bool,
        ``means2d`` (pixels; [C, N, 2], or [nnz, 2] for gsplat with ``packed=True``), ``depths``,
        ``conics``, plus whatever else the backend reports.
    """

    rgb: Tensor
    depth: Tensor
    alpha: Tensor
    meta: dict


def resolve_backend(backend: str, is_cuda: bool) -> str:
    """Concrete backend ("gsplat" or "reference") for a requested name and input device.

    Raises ValueError for an unknown name (argument or ``EVOLSPLAT_RENDERER``) or for gsplat
    without CUDA inputs / without loadable gsplat CUDA ops.
    """
    source = "backend argument"
    if backend == "auto" and os.environ.get(BACKEND_ENV_VAR):
        backend, source = os.environ[BACKEND_ENV_VAR], f"environment variable {BACKEND_ENV_VAR}"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown renderer {backend!r} from the {source}; use one of {BACKENDS}.")
    if backend == "auto":
        return "gsplat" if is_cuda and gsplat_cuda_available() else "reference"
    if backend == "gsplat" and not is_cuda:
        raise ValueError(
            f"Renderer 'gsplat' (from the {source}) needs CUDA tensors but the Gaussians are on "
            "the CPU; move them to a GPU or use backend='reference' (or 'auto')."
        )
    if backend == "gsplat" and not gsplat_cuda_available():
        raise ValueError(
            f"Renderer 'gsplat' (from the {source}) was requested but gsplat's CUDA ops do not "
            "load (see gsplat's build messages); use backend='reference'."
        )
    return backend


def _check_inputs(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    sh_degree: int | None,
    backgrounds: Tensor | None,
    features: bool = False,
) -> None:
    """Raise ValueError naming the argument whose shape or device does not fit the contract.

    ``features``: ``colors`` are D-channel features [N, D] / [C, N, D] (any D >= 1, no SH), as
    :func:`rasterize_features` takes; otherwise RGB or SH as :func:`rasterize` takes."""
    N, C = means.shape[0], viewmats.shape[0]
    expected = {
        "means": (means, (N, 3)),
        "quats": (quats, (N, 4)),
        "scales": (scales, (N, 3)),
        "opacities": (opacities, (N,)),
        "viewmats": (viewmats, (C, 4, 4)),
        "Ks": (Ks, (C, 3, 3)),
    }
    if backgrounds is not None:
        expected["backgrounds"] = (backgrounds, (C, 3))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"rasterize: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.device != means.device:
            raise ValueError(f"rasterize: {name} is on {tensor.device} but means on {means.device}")
    if features:
        ok = colors.dim() in (2, 3) and colors.shape[:-1] in ((N,), (C, N)) and colors.shape[-1] >= 1
        want = f"[{N}, D] or [{C}, {N}, D] features (D >= 1)"
    elif sh_degree is None:
        ok = colors.shape in ((N, 3), (C, N, 3))
        want = f"[{N}, 3] or [{C}, {N}, 3] (RGB; pass sh_degree for SH coefficients)"
    else:
        ok = colors.dim() in (3, 4) and colors.shape[-1] == 3 and (
            colors.shape[:-2] in ((N,), (C, N)) and colors.shape[-2] >= num_sh_bases(sh_degree)
        )
        want = f"[{N}, K, 3] or [{C}, {N}, K, 3] with K >= {num_sh_bases(sh_degree)}"
    if not ok or colors.device != means.device:
        raise ValueError(
            f"rasterize: colors has shape {tuple(colors.shape)} on {colors.device}, expected {want}"
            f" on {means.device}"
        )


def rasterize(
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
    backend: str = "auto",
    packed: bool = False,
) -> RenderOutput:
    """Render N 3D Gaussians into C pinhole cameras (``gsplat.rasterization``, RGB+ED).

    Args:
        means: [N, 3] centres in the world (or segment) frame.
        quats: [N, 4] rotations, wxyz, need not be normalised.
        scales: [N, 3] standard deviations along the rotated axes, linear (not log).
        opacities: [N] in [0, 1] (post-sigmoid).
        colors: RGB [N, 3] or [C, N, 3]; or SH coefficients [N, K, 3] / [C, N, K, 3] when
            ``sh_degree`` is given (gsplat adds 0.5 and clamps at 0, see :mod:`.sh`).
        viewmats: [C, 4, 4] world-to-camera, **OpenCV axes** (x right, y down, z forward).
        Ks: [C, 3, 3] intrinsics in pixels (pixel centres at +0.5).
        width, height: image size in pixels.
        backgrounds: [C, 3] colour where alpha < 1, or None for black.
        near_plane, far_plane: camera-z range (metres) outside which Gaussians are culled.
        backend: "auto", "gsplat" or "reference" (see module docstring).
        packed: gsplat's memory layout option; only changes ``meta`` (ignored by the reference).
    Returns:
        :class:`RenderOutput` with rgb [C, H, W, 3], depth [C, H, W, 1], alpha [C, H, W, 1].
    """
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, sh_degree, backgrounds)
    name = resolve_backend(backend, means.is_cuda)
    common = dict(sh_degree=sh_degree, backgrounds=backgrounds, near_plane=near_plane,
                  far_plane=far_plane)
    args = (means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height))
    if name == "gsplat":
        out, alpha, meta = rasterize_gsplat(*args, packed=packed, **common)
    else:
        out, alpha, meta = rasterize_reference(*args, **common)
    meta.update(backend=name, visible=meta["radii"] > 0)
    return RenderOutput(rgb=out[..., :3], depth=out[..., 3:], alpha=alpha, meta=meta)


def rasterize_features(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, dict]:
    """Alpha-composite D-channel per-Gaussian ``features`` (``gsplat.rasterization`` with
    ``render_mode="RGB"``, no SH, no background, no depth channel added).

    Args: as :func:`rasterize`, with features [N, D] or [C, N, D] (any D >= 1: gsplat pads channel
        counts its kernels lack, e.g. 6 -> 8, and crops them again).
    Returns:
        features [C, H, W, D] (alpha-weighted sums), alpha [C, H, W, 1], meta (as
        :class:`RenderOutput`'s).
    """
    _check_inputs(means, quats, scales, opacities, features, viewmats, Ks, None, None, features=True)
    name = resolve_backend(backend, means.is_cuda)
    common = dict(near_plane=near_plane, far_plane=far_plane, render_mode="RGB")
    args = (means, quats, scales, opacities, features, viewmats, Ks, int(width), int(height))
    if name == "gsplat":
        out, alpha, meta = rasterize_gsplat(*args, **common)
    else:
        out, alpha, meta = rasterize_reference(*args, **common)
    meta.update(backend=name, visible=meta["radii"] > 0)
    return out, alpha, meta


def rasterize_feature_blocks(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    blocks: Tensor | None,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """:func:`rasterize_features` for C cameras that each draw their own Gaussians: row ``n`` only
    into camera ``blocks[n]`` (several targets' view-dependent Gaussians in one call).

    Args: as :func:`rasterize_features` with features [N, D]; ``blocks`` [N] long camera indices
        in [0, C), or None: every row into every camera (:func:`rasterize_features` itself).
    Returns:
        features [C, H, W, D] (alpha-weighted sums) and alpha [C, H, W, 1].
    """
    if blocks is None:
        return rasterize_features(means, quats, scales, opacities, features, viewmats, Ks, width, height,
                                  near_plane=near_plane, far_plane=far_plane, backend=backend)[:2]
    _check_inputs(means, quats, scales, opacities, features, viewmats, Ks, None, None, features=True)
    if blocks.shape != (means.shape[0],):
        raise ValueError(f"rasterize: blocks has shape {tuple(blocks.shape)}, expected ({means.shape[0]},)")
    if resolve_backend(backend, means.is_cuda) == "gsplat":
        return rasterize_blocks_gsplat(means, quats, scales, opacities, features, blocks, viewmats, Ks,
                                       int(width), int(height), near_plane=near_plane, far_plane=far_plane)
    # The reference: one camera at a time on its own rows.
    outs = []
    for c in range(viewmats.shape[0]):
        rows = (blocks == c).nonzero()[:, 0]
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        outs.append(rasterize_reference(pick(means), pick(quats), pick(scales), pick(opacities), pick(features),
                                        viewmats[c:c + 1], Ks[c:c + 1], int(width), int(height),
                                        near_plane=near_plane, far_plane=far_plane, render_mode="RGB")[:2])
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def evaluate_sh(sh_degree: int, dirs: Tensor, coeffs: Tensor, backend: str = "auto") -> Tensor:
    """RGB [..., 3] that :func:`rasterize` would composite for SH ``coeffs`` [..., K, 3] seen along
    ``dirs`` [..., 3] (world frame, camera centre -> Gaussian, any length): ``max(0, SH + 0.5)``,
    with gsplat's kernel or the reference's PyTorch evaluation (``backend`` as in :func:`rasterize`).
    """
    if sh_degree < 0 or coeffs.shape[-2] < num_sh_bases(sh_degree) or coeffs.shape[-1] != 3:
        raise ValueError(f"evaluate_sh: coeffs {tuple(coeffs.shape)} do not hold SH degree {sh_degree}")
    if resolve_backend(backend, coeffs.is_cuda) == "gsplat":
        return evaluate_sh_gsplat(sh_degree, dirs, coeffs)
    return evaluate_sh_reference(sh_degree, dirs, coeffs)
