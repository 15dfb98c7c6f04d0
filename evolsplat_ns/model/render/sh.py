"""RGB <-> degree-0 spherical-harmonic coefficient conversion, in gsplat's convention.

gsplat evaluates SH colours as ``rgb = max(0, C0 * sh0 + 0.5 + higher bands)``; the helpers here
invert and apply that degree-0 part so that a colour stored as SH renders as the same RGB.
"""

from __future__ import annotations

from torch import Tensor

# Y_0^0 = 1 / (2 sqrt(pi)), the constant degree-0 SH basis value.
C0 = 0.28209479177387814


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for bands 0..degree, i.e. (degree + 1)^2."""
    if degree < 0:
        raise ValueError(f"sh_degree must be >= 0, got {degree}")
    return (degree + 1) ** 2


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """RGB [..., 3] in [0, 1] -> degree-0 SH coefficients [..., 3] that gsplat renders as rgb."""
    return (rgb - 0.5) / C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """Degree-0 SH coefficients [..., 3] -> the RGB [..., 3] gsplat renders (before the clamp)."""
    return sh0 * C0 + 0.5
