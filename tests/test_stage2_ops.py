"""Stage 2 restructured for fewer dispatched ops (issue 10): the same results as the readable forms."""

from __future__ import annotations

import torch

from evolsplat_ns.model.stage2.se3 import hat, quat_exp, se3_exp, se3_log, so3_exp, so3_log


def _twists() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(40, 6, generator=g, dtype=torch.float64) * 0.6,
                      torch.randn(5, 6, generator=g, dtype=torch.float64) * 1e-6,  # the Taylor branch
                      torch.zeros(1, 6, dtype=torch.float64)])


def test_se3_exp_equals_the_matrix_exponential_of_the_twist():
    xi = _twists()
    M = torch.zeros(len(xi), 4, 4, dtype=torch.float64)
    M[:, :3, :3], M[:, :3, 3] = hat(xi[:, :3]), xi[:, 3:]
    assert (se3_exp(xi) - torch.linalg.matrix_exp(M)).abs().max() < 1e-12
    assert (so3_exp(xi[:, :3]) - torch.linalg.matrix_exp(hat(xi[:, :3]))).abs().max() < 1e-12
    assert se3_exp(xi.reshape(2, 23, 6)).shape == (2, 23, 4, 4)  # any leading shape, one batched call


def test_logs_invert_the_exponentials_and_quat_exp_matches_the_rotation():
    from evolsplat_ns.geometry import quat_to_matrix

    xi = _twists()
    assert (se3_log(se3_exp(xi)) - xi).abs().max() < 1e-9
    assert (so3_log(so3_exp(xi[:, :3])) - xi[:, :3]).abs().max() < 1e-9
    assert (quat_to_matrix(quat_exp(xi[:, :3])) - so3_exp(xi[:, :3])).abs().max() < 1e-12
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(quat_exp(torch.zeros(3, dtype=dtype)), torch.tensor([1.0, 0, 0, 0], dtype=dtype))
        assert torch.equal(se3_exp(torch.zeros(6, dtype=dtype)), torch.eye(4, dtype=dtype))
