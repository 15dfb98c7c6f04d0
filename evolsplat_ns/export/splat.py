"""The standard 3DGS PLY layout (Inria's, read by common splat viewers) <-> :class:`GaussianParams`.

Vertex properties, all float32, in this order: ``x y z`` (centre), ``nx ny nz`` (zeros),
``f_dc_0..2`` (SH degree-0 per RGB channel), ``f_rest_*`` (higher SH bands, channel-major: all of
red's coefficients, then green's, then blue's), ``opacity`` (logit), ``scale_0..2`` (log metres),
``rot_0..3`` (unit quaternion, w x y z). Positions and rotations stay in whatever frame the
Gaussians are in (for EVolSplat: the segment frame, vehicle axes x forward, y left, z up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evolsplat_ns.utils.ply import read_ply, write_ply
from evolsplat_ns.model.node import GaussianParams

# Opacities are clamped to [EPS, 1 - EPS] before the logit: the sky dome is fully opaque (1.0),
# whose logit would be +inf; logit(1 - 1e-6) ~ 13.8 renders identically in every viewer.
OPACITY_EPS = 1e-6
# Smallest scale written (metres): log(0) would be -inf.
MIN_SCALE = 1e-8


def splat_dtype(num_rest: int) -> np.dtype:
    """Record dtype of the 3DGS layout with ``num_rest`` f_rest properties (3 * (bases - 1))."""
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
             + [f"f_rest_{i}" for i in range(num_rest)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    return np.dtype([(n, "<f4") for n in names])


def to_splat_array(g: GaussianParams) -> np.ndarray:
    """Structured array [M] of the 3DGS layout from ``g`` (means [M, 3], quats wxyz [M, 4],
    linear scales [M, 3], opacities [M] in (0, 1), sh [M, K, 3] DC first)."""
    m, k = g.sh.shape[:2]
    out = np.empty(m, dtype=splat_dtype(3 * (k - 1)))
    cols = {
        "xyz": g.means,
        "n": torch.zeros_like(g.means),
        "dc": g.sh[:, 0],
        # [M, K-1, 3] -> [M, 3, K-1]: Inria stores each channel's coefficients contiguously.
        "rest": g.sh[:, 1:].transpose(1, 2).reshape(m, -1),
        "opacity": torch.logit(g.opacities.clamp(OPACITY_EPS, 1 - OPACITY_EPS))[:, None],
        "scale": g.scales.clamp(min=MIN_SCALE).log(),
        "rot": torch.nn.functional.normalize(g.quats, dim=-1),
    }
    flat = torch.cat([c.detach().float().reshape(m, -1) for c in cols.values()], dim=1).cpu().numpy()
    for i, name in enumerate(out.dtype.names):
        out[name] = flat[:, i]
    return out


def from_splat_array(v: np.ndarray) -> GaussianParams:
    """GaussianParams (activated: linear scales, opacities in (0, 1)) from a 3DGS record array."""
    names = v.dtype.names or ()
    missing = [n for n in splat_dtype(0).names if n not in names]
    if missing:
        raise ValueError(f"not a 3DGS splat: properties {missing} are missing")
    col = lambda *ns: torch.from_numpy(np.stack([v[n] for n in ns], axis=1).astype(np.float32))  # noqa: E731
    rest_names = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n[7:]))
    if len(rest_names) % 3:
        raise ValueError(f"not a 3DGS splat: {len(rest_names)} f_rest properties is not a multiple of 3")
    dc = col("f_dc_0", "f_dc_1", "f_dc_2")[:, None]
    rest = col(*rest_names).reshape(len(v), 3, -1).transpose(1, 2) if rest_names else dc[:, :0]
    return GaussianParams(
        means=col("x", "y", "z"),
        quats=col("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=col("scale_0", "scale_1", "scale_2").exp(),
        opacities=torch.sigmoid(col("opacity")[:, 0]),
        sh=torch.cat([dc, rest], dim=1),
    )


def save_splat(path: Path | str, g: GaussianParams, comments: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write ``g`` as a standard 3DGS PLY at ``path`` (refuses to replace a file unless ``overwrite``)."""
    return write_ply(path, to_splat_array(g), comments, overwrite)


def load_splat(path: Path | str) -> tuple[GaussianParams, np.ndarray, list[str]]:
    """Read a 3DGS PLY: (activated GaussianParams, the raw record array, header comments)."""
    raw, comments = read_ply(path)
    return from_splat_array(raw), raw, comments
