"""Coordinate frames and small rigid-transform helpers.

Frames used across evolsplat-ns (see docs/architecture.md):

- **Waymo camera axes** (drivestudio ``extrinsics/{cam}.txt``): x forward, y left, z up.
- **OpenCV camera axes**: x right, y down, z forward (looking direction). Every camera-to-world
  matrix inside evolsplat-ns is OpenCV unless a name says otherwise.
- **OpenGL / nerfstudio camera axes**: x right, y up, z backward. Only used at the nerfstudio
  ``Cameras`` boundary (viewer, ns-eval), converted by :func:`opencv_to_opengl`.
- **Vehicle frame** (Waymo): x forward, y left, z up, origin at the rear axle on the ground.
- **World** (drivestudio ``ego_pose``): Waymo's global ENU frame, vehicle-to-world per frame.
- **Segment frame**: the vehicle frame at the first frame of a segment. All tensors a
  ``MultiSceneDataset`` sample carries are in this frame (keeps coordinates small for fp16/voxels).
"""

from __future__ import annotations

import numpy as np
import torch

# Waymo camera axes (x fwd, y left, z up) <- OpenCV camera axes (x right, y down, z fwd).
# OpenCV camera-to-vehicle = extrinsic_waymo @ OPENCV2DATASET.
OPENCV2DATASET = np.array(
    [[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)
# OpenCV camera axes -> OpenGL camera axes (flip y and z); self-inverse.
OPENCV2OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def is_rigid(T: np.ndarray, atol: float = 1e-3) -> bool:
    """True if ``T`` [4, 4] is finite, has last row [0,0,0,1] and an orthonormal rotation, det +1."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return False
    R = T[:3, :3]
    return (
        np.allclose(T[3], [0, 0, 0, 1], atol=atol)
        and np.allclose(R @ R.T, np.eye(3), atol=atol)
        and abs(np.linalg.det(R) - 1.0) < atol
    )


def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``T`` [..., 4, 4] without a general matrix inverse."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    # fill_ is a kernel; assigning a Python scalar through __setitem__ copies a host tensor to the
    # device, which synchronises the stream (once per rendered view).
    out[..., 3, 3].fill_(1.0)
    return out


def opencv_to_opengl(c2w: torch.Tensor) -> torch.Tensor:
    """OpenCV camera-to-world [..., 4, 4] -> OpenGL (nerfstudio) camera-to-world, same world."""
    flip = torch.tensor(OPENCV2OPENGL, dtype=c2w.dtype, device=c2w.device)
    return c2w @ flip


def opengl_to_opencv(c2w: torch.Tensor) -> torch.Tensor:
    """OpenGL (nerfstudio) camera-to-world [..., 4, 4] -> OpenCV camera-to-world, same world."""
    return opencv_to_opengl(c2w)


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pinhole matrix K [3, 3] in pixels (OpenCV convention, pixel centres at +0.5)."""
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)


def project_points(
    points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into OpenCV cameras.

    Args:
        points: [N, 3] in the world (or segment) frame.
        K: [C, 3, 3] pixel intrinsics.
        w2c: [C, 4, 4] world-to-camera, OpenCV axes.
    Returns:
        uv: [C, N, 2] pixel coordinates (x right, y down); depth: [C, N] camera z (metres).
    """
    cam = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]
    depth = cam[..., 2]
    pix = cam @ K.transpose(-1, -2)
    uv = pix[..., :2] / depth.clamp(min=1e-6)[..., None]
    return uv, depth


# -- rotations as quaternions (wxyz, as gsplat) ------------------------------------------------------


# matrix_to_quat as one linear map: the ten quantities d = [4w², 4x², 4y², 4z² (each up to the
# shared 1 + ...), and the six sums/differences of off-diagonal entries] are A · vec(R) + b, and
# the symmetric 4x4 matrix N = d[_QUAT_ROWS] has row i = 4 q_i · q. The row of the largest q_i²
# normalised is q: a dozen kernels instead of one per matrix entry (this runs per target view).
_QUAT_D_OF_R = np.zeros((9, 10))
_QUAT_D_BIAS = np.array([1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0, 0, 0])
for _col, _terms in enumerate([
        {0: 1, 4: 1, 8: 1}, {0: 1, 4: -1, 8: -1}, {0: -1, 4: 1, 8: -1}, {0: -1, 4: -1, 8: 1},
        {7: 1, 5: -1}, {2: 1, 6: -1}, {3: 1, 1: -1},  # m21 - m12, m02 - m20, m10 - m01
        {1: 1, 3: 1}, {2: 1, 6: 1}, {5: 1, 7: 1}]):  # m01 + m10, m02 + m20, m12 + m21
    for _entry, _sign in _terms.items():
        _QUAT_D_OF_R[_entry, _col] = _sign
_QUAT_ROWS = [[0, 4, 5, 6], [4, 1, 7, 8], [5, 7, 2, 9], [6, 8, 9, 3]]
_QUAT_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _quat_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (device, dtype)
    if key not in _QUAT_CONSTANTS:  # built once per device: no host-to-device copy per call
        _QUAT_CONSTANTS[key] = (torch.as_tensor(_QUAT_D_OF_R, dtype=dtype, device=device),
                                torch.as_tensor(_QUAT_D_BIAS, dtype=dtype, device=device),
                                torch.as_tensor(_QUAT_ROWS, dtype=torch.long, device=device).reshape(-1))
    return _QUAT_CONSTANTS[key]


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (wxyz, w >= 0) of rotation matrices ``R`` [..., 3, 3].

    Shepperd's method: of the four ways to read q off R, the one dividing by the largest of
    4w², 4x², 4y², 4z² is used (stable everywhere); differentiable. Reference: :func:`_matrix_to_quat_reference`.
    """
    A, b, rows = _quat_constants(R.device, R.dtype)
    d = torch.addmm(b, R.reshape(-1, 9), A)  # [M, 10]
    best = d[:, :4].argmax(dim=-1, keepdim=True)  # [M, 1]
    n = d[:, rows].reshape(-1, 4, 4)  # row i = 4 q_i q
    q = n.gather(1, best[:, :, None].expand(-1, 1, 4))[:, 0]
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0) / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return q.reshape(*R.shape[:-2], 4)


def _matrix_to_quat_reference(R: torch.Tensor) -> torch.Tensor:
    """Entry-by-entry Shepperd's method (the readable twin of :func:`matrix_to_quat`, for tests)."""
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cand = torch.stack([1 + tr, 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                        1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], dim=-1)
    best = cand.argmax(dim=-1)
    s = cand.gather(1, best[:, None])[:, 0].clamp(min=1e-12).sqrt() * 2  # 4 * |q_best|
    rows = {
        0: torch.stack([s / 4, (m[:, 2, 1] - m[:, 1, 2]) / s, (m[:, 0, 2] - m[:, 2, 0]) / s, (m[:, 1, 0] - m[:, 0, 1]) / s], -1),
        1: torch.stack([(m[:, 2, 1] - m[:, 1, 2]) / s, s / 4, (m[:, 0, 1] + m[:, 1, 0]) / s, (m[:, 0, 2] + m[:, 2, 0]) / s], -1),
        2: torch.stack([(m[:, 0, 2] - m[:, 2, 0]) / s, (m[:, 0, 1] + m[:, 1, 0]) / s, s / 4, (m[:, 1, 2] + m[:, 2, 1]) / s], -1),
        3: torch.stack([(m[:, 1, 0] - m[:, 0, 1]) / s, (m[:, 0, 2] + m[:, 2, 0]) / s, (m[:, 1, 2] + m[:, 2, 1]) / s, s / 4], -1),
    }
    q = torch.zeros(m.shape[0], 4, dtype=m.dtype, device=m.device)
    for i, row in rows.items():
        q = torch.where((best == i)[:, None], row, q)
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0)
    return (q / q.norm(dim=-1, keepdim=True)).reshape(*R.shape[:-2], 4)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] of quaternions ``q`` [..., 4] (wxyz, normalised here).

    The entries are quadratic forms of the unit quaternion, so one outer product, one matrix
    product with a constant table and one division by ``|q|^2`` (five kernels per call, for the box
    poses of every target view) replace the formula's thirty; :func:`_quat_to_matrix_reference`
    is the formula."""
    table = _on(_ROTATION, q)
    outer = (q[..., :, None] * q[..., None, :]).reshape(*q.shape[:-1], 16)
    return ((outer @ table.T) / (q * q).sum(-1, keepdim=True)).reshape(*q.shape[:-1], 3, 3)


def _quat_to_matrix_reference(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], dim=-1).reshape(*q.shape[:-1], 3, 3)


def _rotation_table() -> np.ndarray:
    """[9, 16] T with R(q)_i = sum_jk T[i, 4j + k] q_j q_k for a unit quaternion q (wxyz), row-major
    R; the diagonal's 1 is written as w^2 + x^2 + y^2 + z^2."""
    w, x, y, z = range(4)
    T = np.zeros((9, 4, 4))
    terms = {0: [(w, w, 1), (x, x, 1), (y, y, -1), (z, z, -1)], 1: [(x, y, 2), (w, z, -2)],
             2: [(x, z, 2), (w, y, 2)], 3: [(x, y, 2), (w, z, 2)], 4: [(w, w, 1), (x, x, -1), (y, y, 1), (z, z, -1)],
             5: [(y, z, 2), (w, x, -2)], 6: [(x, z, 2), (w, y, -2)], 7: [(y, z, 2), (w, x, 2)],
             8: [(w, w, 1), (x, x, -1), (y, y, -1), (z, z, 1)]}
    for i, products in terms.items():
        for j, k, c in products:
            T[i, j, k] += c
    return T.reshape(9, 16)


def _on(table: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``table`` as a tensor of ``like``'s dtype and device, copied there once."""
    key = (id(table), like.device, like.dtype)
    if key not in _TABLES_ON:
        _TABLES_ON[key] = torch.as_tensor(table, dtype=like.dtype, device=like.device)
    return _TABLES_ON[key]


_TABLES_ON: dict[tuple, torch.Tensor] = {}


def _hamilton_table() -> np.ndarray:
    """[4, 16] C with (a ⊗ b)_i = sum_jk C[i, 4j + k] a_j b_k (wxyz)."""
    C = np.zeros((4, 4, 4))
    for i, j, k, sign in [(0, 0, 0, 1), (0, 1, 1, -1), (0, 2, 2, -1), (0, 3, 3, -1),
                          (1, 0, 1, 1), (1, 1, 0, 1), (1, 2, 3, 1), (1, 3, 2, -1),
                          (2, 0, 2, 1), (2, 1, 3, -1), (2, 2, 0, 1), (2, 3, 1, 1),
                          (3, 0, 3, 1), (3, 1, 2, 1), (3, 2, 1, -1), (3, 3, 0, 1)]:
        C[i, j, k] = sign
    return C.reshape(4, 16)


_HAMILTON = _hamilton_table()
_ROTATION = _rotation_table()


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a ⊗ b`` of quaternions [..., 4] (wxyz): rotate by ``b``, then by ``a``.

    One outer product and one matrix product (two kernels, per actor Gaussian per target view)
    instead of sixteen products and twelve sums; :func:`_quat_multiply_reference` is the formula."""
    table = _on(_HAMILTON, a)
    a, b = torch.broadcast_tensors(a, b)
    outer = (a[..., :, None] * b[..., None, :]).reshape(*a.shape[:-1], 16)
    return outer @ table.T


def _quat_multiply_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of unit quaternions ``a``, ``b`` [..., 4] at weights ``w`` [...]
    (0 -> a, 1 -> b), along the shorter arc."""
    dot = (a * b).sum(-1, keepdim=True)
    b = torch.where(dot < 0, -b, b)
    dot = dot.abs().clamp(max=1.0)
    w = w[..., None]
    exact = dot >= 1.0  # acos has an infinite derivative at 1: keep it out of the graph (stage 2 trains poses)
    theta = torch.acos(torch.where(exact, torch.zeros_like(dot), dot))
    sin = torch.sin(theta)
    near = exact | (sin < 1e-6)  # nearly equal rotations: linear interpolation is exact enough
    wa = torch.where(near, 1 - w, torch.sin((1 - w) * theta) / sin.clamp(min=1e-12))
    wb = torch.where(near, w, torch.sin(w * theta) / sin.clamp(min=1e-12))
    q = wa * a + wb * b
    return q / q.norm(dim=-1, keepdim=True)


def rigid_matrix(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rigid transforms [..., 4, 4] from rotations ``R`` [..., 3, 3] and translations ``t`` [..., 3]."""
    bottom = torch.zeros(*R.shape[:-2], 1, 4, dtype=R.dtype, device=R.device)
    bottom[..., 0, 3].fill_(1)  # fill_, not a scalar __setitem__ (that copies the scalar: a CUDA sync)
    return torch.cat([torch.cat([R, t[..., None]], dim=-1), bottom], dim=-2)


def interpolate_rigid(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rigid poses [..., 4, 4] a fraction ``w`` [...] of the way from ``a`` to ``b`` [..., 4, 4]
    (slerp of the rotation, linear position), in whatever frame both are given."""
    q = slerp(matrix_to_quat(a[..., :3, :3]), matrix_to_quat(b[..., :3, :3]), w)
    out = torch.zeros_like(a)
    out[..., :3, :3] = quat_to_matrix(q)
    out[..., :3, 3] = (1 - w[..., None]) * a[..., :3, 3] + w[..., None] * b[..., :3, 3]
    out[..., 3, 3] = 1
    return out


def interpolate_pose(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """[4, 4] float64 rigid pose ``fraction`` of the way from ``a`` to ``b`` (slerp, lerp position)."""
    out = interpolate_rigid(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64)),
                            torch.tensor(float(fraction), dtype=torch.float64))
    return out.numpy()
