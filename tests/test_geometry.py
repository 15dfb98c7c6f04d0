"""The compact rotation helpers equal their entry-by-entry formulas, and the actors' exact-frame
pose path equals the interpolating one."""

import math

import torch

from evolsplat_ns.data.actors import poses_at
from evolsplat_ns.geometry import (_matrix_to_quat_reference, _quat_multiply_reference, _quat_to_matrix_reference,
                                   matrix_to_quat, quat_multiply, quat_to_matrix, rigid_matrix)
from evolsplat_ns.model.actors import ActorNodes


def _unit_quats(n: int, seed: int = 0) -> torch.Tensor:
    q = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    special = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]],
                           dtype=torch.float64)  # identity and half turns: each branch of Shepperd's method
    q = torch.cat([q, special])
    return q / q.norm(dim=-1, keepdim=True)


def test_matrix_to_quat_matches_reference_and_round_trips():
    R = quat_to_matrix(_unit_quats(2000))
    q = matrix_to_quat(R)
    assert torch.allclose(q, _matrix_to_quat_reference(R), atol=1e-12)
    assert torch.allclose(quat_to_matrix(q), R, atol=1e-12)
    assert (q[:, 0] >= 0).all()
    batched = R.float().reshape(2, 1003, 3, 3)
    assert matrix_to_quat(batched).shape == (2, 1003, 4)


def test_matrix_to_quat_gradient_matches_reference():
    R = quat_to_matrix(_unit_quats(50, seed=1)).requires_grad_()
    w = torch.randn(56, 4, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((matrix_to_quat(R) * w).sum(), R)
    (g_ref,) = torch.autograd.grad((_matrix_to_quat_reference(R) * w).sum(), R)
    assert torch.allclose(g_fast, g_ref, atol=1e-9)


def test_quat_to_matrix_matches_reference_with_its_gradient():
    """Unnormalised quaternions of any batch shape: the same rotations and gradients."""
    q = (_unit_quats(400, 4) * torch.rand(406, 1, dtype=torch.float64) * 3 + 0.1).reshape(2, 203, 4).requires_grad_()
    R, ref = quat_to_matrix(q), _quat_to_matrix_reference(q)
    assert R.shape == (2, 203, 3, 3) and torch.allclose(R, ref, atol=1e-12)
    w = torch.randn(2, 203, 3, 3, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((R * w).sum(), q)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), q)
    assert torch.allclose(g_fast, g_ref, atol=1e-10)
    assert torch.allclose(quat_to_matrix(torch.tensor([1.0, 0, 0, 0])), torch.eye(3))


def test_quat_multiply_matches_reference_with_broadcasting():
    a, b = _unit_quats(300, 2), _unit_quats(300, 3)
    assert torch.allclose(quat_multiply(a, b), _quat_multiply_reference(a, b), atol=1e-12)
    assert torch.allclose(quat_multiply(a[:1], b), _quat_multiply_reference(a[:1].expand_as(b), b), atol=1e-12)
    # composition order: rotating by b then a is the matrix product R(a) R(b)
    assert torch.allclose(quat_to_matrix(quat_multiply(a, b)), quat_to_matrix(a) @ quat_to_matrix(b), atol=1e-10)


def _nodes() -> ActorNodes:
    K, F = 3, 5
    yaw = torch.linspace(0, 1.2, K * F).reshape(K, F)
    R = torch.zeros(K, F, 3, 3)
    R[..., 0, 0], R[..., 0, 1], R[..., 1, 0], R[..., 1, 1], R[..., 2, 2] = yaw.cos(), -yaw.sin(), yaw.sin(), yaw.cos(), 1
    poses = rigid_matrix(R, torch.randn(K, F, 3, generator=torch.Generator().manual_seed(4)))
    valid = torch.ones(K, F, dtype=torch.bool)
    valid[1, 3] = False
    n = 6
    return ActorNodes(torch.zeros(n, 3), torch.zeros(n, 3), torch.zeros(n, 3), torch.arange(n) % K,
                      torch.arange(10, 10 + F), poses, valid, torch.ones(K, 3))


def test_pose_at_exact_frame_reads_the_stored_pose_and_agrees_with_interpolation():
    nodes = _nodes()
    for time in (10.0, 12.0, 13.0, 11.5, 12.25, 9.0, 15.0):
        R, pos, q, ok = nodes.pose_at(time)
        ref, ref_ok = poses_at(nodes.frames, nodes.poses, nodes.valid, torch.tensor([time]))
        assert torch.equal(ok, ref_ok[0]), time
        assert torch.allclose(R[ok], ref[0, ok, :3, :3], atol=1e-5) and torch.allclose(pos[ok], ref[0, ok, :3, 3], atol=1e-5)
        assert torch.allclose(quat_to_matrix(q[ok]), R[ok], atol=1e-5)
    R, pos, _, ok = nodes.pose_at(13.0)
    assert torch.equal(R, nodes.poses[:, 3, :3, :3]) and not bool(ok[1])  # exact: no round trip through quaternions


def test_box_quats_follow_new_poses():
    nodes = _nodes()
    before = nodes.box_quats()
    nodes.repose(nodes.poses @ rigid_matrix(quat_to_matrix(torch.tensor([math.cos(0.2), 0, 0, math.sin(0.2)])),
                                            torch.zeros(3)))
    assert not torch.allclose(nodes.box_quats(), before)
    assert torch.allclose(quat_to_matrix(nodes.box_quats()), nodes.poses[..., :3, :3], atol=1e-5)


def test_camera_to_opencv_inverts_views_to_cameras():
    from evolsplat_ns.data.cameras import camera_to_opencv, poses_to_cameras

    g = torch.Generator().manual_seed(3)
    R = quat_to_matrix(_unit_quats(1, seed=3)).float()[0]
    c2w = torch.eye(4)
    c2w[:3, :3], c2w[:3, 3] = R, torch.randn(3, generator=g)
    K = torch.tensor([[500.0, 0, 320.5], [0, 510.0, 240.25], [0, 0, 1]])
    camera = poses_to_cameras(c2w[None], K[None], 640, 480)[0:1]
    back, K_back, W, H = camera_to_opencv(camera, "cpu")
    assert (W, H) == (640, 480) and isinstance(W, int)
    torch.testing.assert_close(back, c2w, atol=1e-6, rtol=0)
    torch.testing.assert_close(K_back, K)
    assert back.dtype == K_back.dtype == torch.float32 and back.device.type == "cpu"
