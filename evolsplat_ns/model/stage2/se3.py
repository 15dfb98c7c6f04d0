"""SE(3) / SO(3) exponential and logarithm maps in torch (differentiable, vectorised over any leading shape).

A twist ``xi`` [..., 6] is ``[omega (3, axis-angle rad), v (3, metres)]``. ``se3_exp`` returns the
rigid transform [..., 4, 4] whose rotation is ``Exp(omega)`` and whose translation is ``V(omega) v``
(the closed form of the matrix exponential). Near ``|omega| = 0`` Taylor series replace the ratios,
and the divisions use a safe angle, so gradients reach all 6 dimensions at and around 0.

Each map is written with few tensor ops (the three ratios A, B, C in one stacked division, fused
multiply-adds, cached constants): stage 2 calls them once per step on [K, F] batches, and on a
large GPU the step is bound by how many kernels it launches, not by their size.
"""

from __future__ import annotations

import torch

_SMALL = 1e-4
_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(I3 [3, 3], the rigid bottom row [1, 4], A, B, C at 0 [3], their θ² Taylor coefficients [3]),
    built once per device and dtype (no host-to-device copy per call)."""
    key = (device, dtype)
    if key not in _CONSTANTS:
        with torch.inference_mode(False):  # usable in training graphs even if first built under inference
            _CONSTANTS[key] = (torch.eye(3, dtype=dtype, device=device),
                               torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=dtype, device=device),
                               torch.tensor([1.0, 0.5, 1.0 / 6], dtype=dtype, device=device),
                               torch.tensor([-1.0 / 6, -1.0 / 24, -1.0 / 120], dtype=dtype, device=device))
    return _CONSTANTS[key]


def hat(w: torch.Tensor) -> torch.Tensor:
    """Skew matrices [..., 3, 3] of vectors ``w`` [..., 3] (``hat(a) @ b == a x b``)."""
    x, y, z = w.unbind(-1)
    nx, ny, nz = (-w).unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, nz, y, z, o, nx, ny, x, o], dim=-1).reshape(*w.shape[:-1], 3, 3)


def vee(W: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat` on the antisymmetric part of ``W`` [..., 3, 3] -> [..., 3]."""
    D = W - W.transpose(-1, -2)
    return 0.5 * torch.stack([D[..., 2, 1], D[..., 0, 2], D[..., 1, 0]], -1)


def _coefficients(theta: torch.Tensor, count: int = 3) -> torch.Tensor:
    """[..., count] of A = sin t / t, B = (1 - cos t) / t^2, C = (t - sin t) / t^3 (the first
    ``count``), with Taylor series (to t^2) where t < ``_SMALL``."""
    small = theta < _SMALL
    t = torch.where(small, torch.ones_like(theta), theta)  # safe angle: no 0/0 in the unused branch
    _, _, at0, t2coef = _constants(theta.device, theta.dtype)
    taylor = torch.addcmul(at0[:count], (theta * theta)[..., None], t2coef[:count])
    s = torch.sin(t)
    if count == 1:
        exact = (s / t)[..., None]
    else:
        c = torch.cos(t)
        tt = t * t
        num = [s, 1 - c, t - s][:count]
        den = [t, tt, tt * t][:count]
        exact = torch.stack(num, -1) / torch.stack(den, -1)
    return torch.where(small[..., None], taylor, exact)


def _norm(w: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0: add a tiny epsilon inside (the Taylor branch is used there)
    return (w * w).sum(-1).add(1e-24).sqrt()


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] of axis-angle vectors ``omega`` [..., 3] (Rodrigues)."""
    AB = _coefficients(_norm(omega), 2)
    W = hat(omega)
    eye = _constants(omega.device, omega.dtype)[0]
    return torch.addcmul(torch.addcmul(eye, AB[..., 0, None, None], W), AB[..., 1, None, None], W @ W)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors [..., 3] of rotation matrices ``R`` [..., 3, 3] (angle in [0, pi))."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) * 0.5).clamp(-1 + 1e-7, 1 - 1e-7)
    return vee(R) / _coefficients(torch.acos(cos), 1)


def quat_exp(omega: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (wxyz) of axis-angle vectors ``omega`` [..., 3]; exactly (1, 0, 0, 0) at 0
    (there half-angle² <= 1e-24, so the Taylor w = 1 - half²/2 rounds to 1 in every float type)."""
    half = 0.5 * _norm(omega)
    small = half < _SMALL
    h = torch.where(small, torch.ones_like(half), half)
    hh = half * half
    s = torch.where(small, torch.rsub(hh, 0.5, alpha=1.0 / 12), torch.sin(h) / h * 0.5)  # sin(|w|/2) / |w|
    w = torch.where(small, torch.rsub(hh, 1.0, alpha=0.5), torch.cos(h))
    return torch.cat([w[..., None], s[..., None] * omega], dim=-1)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Rigid transforms [..., 4, 4] of twists ``xi`` [..., 6] = [omega, v]; ``se3_exp(0) == I`` exactly."""
    omega, v = xi[..., :3], xi[..., 3:]
    ABC = _coefficients(_norm(omega), 3)
    A, B, C = ABC[..., 0, None, None], ABC[..., 1, None, None], ABC[..., 2, None, None]
    W = hat(omega)
    W2 = W @ W
    eye, bottom = _constants(xi.device, xi.dtype)[:2]
    R = torch.addcmul(torch.addcmul(eye, A, W), B, W2)
    V = torch.addcmul(torch.addcmul(eye, B, W), C, W2)
    top = torch.cat([R, V @ v[..., None]], dim=-1)
    return torch.cat([top, bottom.expand(*top.shape[:-2], 1, 4)], dim=-2)


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """Twists [..., 6] = [omega, v] of rigid transforms ``T`` [..., 4, 4] (inverse of :func:`se3_exp`)."""
    omega = so3_log(T[..., :3, :3])
    theta = _norm(omega)
    AB = _coefficients(theta, 2)
    small = theta < _SMALL
    t2 = torch.where(small, torch.ones_like(theta), theta * theta)
    # V^-1 = I - W/2 + (1 - A / (2B)) / theta^2 W^2
    D = torch.where(small, torch.full_like(theta, 1.0 / 12), (1 - AB[..., 0] / (2 * AB[..., 1])) / t2)
    W = hat(omega)
    eye = _constants(T.device, T.dtype)[0]
    V_inv = torch.addcmul(torch.add(eye, W, alpha=-0.5), D[..., None, None], W @ W)
    v = (V_inv @ T[..., :3, 3:])[..., 0]
    return torch.cat([omega, v], dim=-1)
