"""SE(3) / SO(3) exponential and logarithm maps in torch (differentiable, built with ``torch.stack``).

A twist ``xi`` [..., 6] is ``[omega (3, axis-angle rad), v (3, metres)]``. ``se3_exp`` returns the
rigid transform [..., 4, 4] whose rotation is ``Exp(omega)`` and whose translation is ``V(omega) v``
(the closed form of the matrix exponential). Near ``|omega| = 0`` Taylor series replace the ratios,
and the divisions use a safe angle, so gradients reach all 6 dimensions at and around 0.
"""

from __future__ import annotations

import torch

_SMALL = 1e-4


def hat(w: torch.Tensor) -> torch.Tensor:
    """Skew matrices [..., 3, 3] of vectors ``w`` [..., 3] (``hat(a) @ b == a x b``)."""
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*w.shape[:-1], 3, 3)


def vee(W: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat` on the antisymmetric part of ``W`` [..., 3, 3] -> [..., 3]."""
    return 0.5 * torch.stack([W[..., 2, 1] - W[..., 1, 2], W[..., 0, 2] - W[..., 2, 0], W[..., 1, 0] - W[..., 0, 1]], -1)


def _coefficients(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = sin t / t, B = (1 - cos t) / t^2, C = (t - sin t) / t^3, with Taylor series near 0."""
    small = theta < _SMALL
    t = torch.where(small, torch.ones_like(theta), theta)  # safe angle: no 0/0 in the unused branch
    t2 = theta * theta
    A = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    B = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / (t * t))
    C = torch.where(small, 1.0 / 6 - t2 / 120, (t - torch.sin(t)) / (t * t * t))
    return A, B, C


def _norm(w: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0: add a tiny epsilon inside (the Taylor branch is used there)
    return (w * w).sum(-1).add(1e-24).sqrt()


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] of axis-angle vectors ``omega`` [..., 3] (Rodrigues)."""
    A, B, _ = _coefficients(_norm(omega))
    W = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(W)
    return eye + A[..., None, None] * W + B[..., None, None] * (W @ W)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors [..., 3] of rotation matrices ``R`` [..., 3, 3] (angle in [0, pi))."""
    cos = ((R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    A, _, _ = _coefficients(theta)
    return vee(R) / A[..., None]


def quat_exp(omega: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (wxyz) of axis-angle vectors ``omega`` [..., 3]; exactly (1, 0, 0, 0) at 0."""
    half = 0.5 * _norm(omega)
    small = half < _SMALL
    h = torch.where(small, torch.ones_like(half), half)
    s = torch.where(small, 0.5 - half * half / 12, torch.sin(h) / h * 0.5)  # sin(|w|/2) / |w|
    w = torch.where(small, 1 - half * half / 2, torch.cos(h))
    w = torch.where(omega.abs().sum(-1) == 0, torch.ones_like(w), w)
    return torch.cat([w[..., None], s[..., None] * omega], dim=-1)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Rigid transforms [..., 4, 4] of twists ``xi`` [..., 6] = [omega, v]; ``se3_exp(0) == I`` exactly."""
    omega, v = xi[..., :3], xi[..., 3:]
    A, B, C = _coefficients(_norm(omega))
    W = hat(omega)
    W2 = W @ W
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(W)
    R = eye + A[..., None, None] * W + B[..., None, None] * W2
    V = eye + B[..., None, None] * W + C[..., None, None] * W2
    t = (V @ v[..., None])[..., 0]
    top = torch.cat([R, t[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom = torch.cat([bottom[..., :3], torch.ones_like(bottom[..., 3:])], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """Twists [..., 6] = [omega, v] of rigid transforms ``T`` [..., 4, 4] (inverse of :func:`se3_exp`)."""
    omega = so3_log(T[..., :3, :3])
    theta = _norm(omega)
    A, B, _ = _coefficients(theta)
    small = theta < _SMALL
    t2 = torch.where(small, torch.ones_like(theta), theta * theta)
    # V^-1 = I - W/2 + (1 - A / (2B)) / theta^2 W^2
    D = torch.where(small, torch.full_like(theta, 1.0 / 12), (1 - A / (2 * B)) / t2)
    W = hat(omega)
    eye = torch.eye(3, dtype=T.dtype, device=T.device).expand_as(W)
    V_inv = eye - 0.5 * W + D[..., None, None] * (W @ W)
    v = (V_inv @ T[..., :3, 3:])[..., 0]
    return torch.cat([omega, v], dim=-1)
