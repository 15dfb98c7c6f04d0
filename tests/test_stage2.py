"""Stage 2: SE(3) maps, refine heads (identity at init), the render hook, the loss, the controller."""

from __future__ import annotations

import math

import pytest
import torch

from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.heads import GAUSSIAN_INPUT_LAYOUT, GAUSSIAN_OUTPUT_LAYOUT, GaussianRefineHead
from evolsplat_ns.model.stage2.refiner import Stage2Refiner
from evolsplat_ns.model.stage2.se3 import quat_exp, se3_exp, se3_log, so3_exp


def small_config(**kw) -> Stage2Config:
    return Stage2Config(enabled=True, gaussian_feature_dim=16, pose_feature_dim=16, gaussian_num_heads=2, **kw)


def toy_actors(K: int = 2, n: int = 20, F: int = 5, seed: int = 0) -> tuple[ActorGaussians, ActorNodes]:
    """K actors of n Gaussians over F frames, each moving 1 m per frame along x; actor 1 misses frame 2."""
    g = torch.Generator().manual_seed(seed)
    N = K * n
    actor = torch.arange(K).repeat_interleave(n)
    means = torch.rand(N, 3, generator=g) - 0.5
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    gauss = ActorGaussians(means, quats, torch.rand(N, 3, generator=g) * 0.1 + 0.01,
                           torch.rand(N, generator=g) * 0.8 + 0.1, torch.randn(N, 4, 3, generator=g), actor)
    poses = torch.eye(4).repeat(K, F, 1, 1)
    poses[:, :, 0, 3] = torch.arange(F, dtype=torch.float32)
    poses[:, :, 1, 3] = torch.arange(K, dtype=torch.float32)[:, None] * 3
    valid = torch.ones(K, F, dtype=torch.bool)
    if K > 1:
        valid[1, 2] = False
    nodes = ActorNodes(means, gauss.sh[:, 0], gauss.scales.log(), actor, torch.arange(F), poses, valid,
                       torch.tensor([[4.0, 2.0, 1.5]]).repeat(K, 1), tuple(str(k) for k in range(K)))
    return gauss, nodes


def _clip_angle(xi: torch.Tensor, max_angle: float = 3.0) -> torch.Tensor:
    w = xi[:, :3]
    n = w.norm(dim=-1, keepdim=True)
    return torch.cat([w / n * n.clamp(max=max_angle), xi[:, 3:]], -1)


# -- 1. SE(3) ----------------------------------------------------------------------------------------


def test_se3_exp_log_round_trip():
    xi = _clip_angle(torch.randn(500, 6, dtype=torch.float64))
    assert (se3_log(se3_exp(xi)) - xi).abs().max() < 1e-6
    tiny = torch.randn(50, 6, dtype=torch.float64) * 1e-7
    assert (se3_log(se3_exp(tiny)) - tiny).abs().max() < 1e-12
    T = se3_exp(xi)
    R = T[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-12)
    assert torch.equal(se3_exp(torch.zeros(6)), torch.eye(4))


def test_quat_exp_matches_rodrigues():
    from evolsplat_ns.geometry import quat_to_matrix

    w = torch.randn(20, 3, dtype=torch.float64)
    assert torch.allclose(quat_to_matrix(quat_exp(w)), so3_exp(w), atol=1e-12)
    assert torch.equal(quat_exp(torch.zeros(3)), torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("at_zero", [True, False])
def test_gradients_reach_all_six_pose_dims(at_zero):
    xi = (torch.zeros(6) if at_zero else torch.randn(6) * 0.3).double().requires_grad_(True)
    points = torch.randn(10, 3, dtype=torch.float64)
    T = se3_exp(xi)
    moved = points @ T[:3, :3].T + T[:3, 3]
    (moved * torch.randn_like(moved)).sum().backward()
    assert torch.all(xi.grad.abs() > 0) and torch.all(torch.isfinite(xi.grad))
    assert torch.autograd.gradcheck(se3_exp, (xi.detach().clone().requires_grad_(True),))


# -- 1. heads ----------------------------------------------------------------------------------------


def test_refiner_is_exact_identity_at_init():
    gauss, nodes = toy_actors()
    out = Stage2Refiner(small_config())(gauss, nodes)
    for name in ("means", "quats", "scales", "opacities", "sh"):
        assert torch.equal(getattr(out.gaussians, name), getattr(gauss, name)), name
    assert torch.equal(out.poses, nodes.poses)
    assert torch.allclose(out.gaussians.quats.norm(dim=-1), torch.ones(len(gauss.actor)), atol=1e-6)
    assert bool(out.refined.all())


def test_layouts_are_named_and_do_not_overlap():
    for layout, dim in ((GAUSSIAN_INPUT_LAYOUT, 14), (GAUSSIAN_OUTPUT_LAYOUT, 13)):
        covered = sorted(i for s in layout.values() for i in range(s.start, s.stop))
        assert covered == list(range(dim))


def test_gaussian_head_is_permutation_equivariant():
    torch.manual_seed(0)
    head = GaussianRefineHead(feature_dim=16, num_heads=2)
    torch.nn.init.normal_(head.out.weight)  # non-zero output, else equivariance is trivial
    g = torch.randn(30, 14)
    perm = torch.randperm(30)
    assert torch.allclose(head(g)[0][perm], head(g[perm])[0], atol=1e-5)


def test_refined_quaternions_stay_unit_after_training_moves_the_heads():
    gauss, nodes = toy_actors()
    refiner = Stage2Refiner(small_config())
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.5)
    out = refiner(gauss, nodes)
    assert torch.allclose(out.gaussians.quats.norm(dim=-1), torch.ones(len(gauss.actor)), atol=1e-5)
    assert not torch.equal(out.poses, nodes.poses)
    R = out.poses[..., :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand_as(R), atol=1e-5)
    assert out.xi[..., :3].abs().max() <= 0.1 + 1e-6 and out.xi[..., 3:].abs().max() <= 0.5 + 1e-6
    assert torch.equal(out.xi[1, 2], torch.zeros(6))  # no box at that frame: no correction


def test_point_budget_caps_what_the_heads_see():
    gauss, nodes = toy_actors(n=50)
    refiner = Stage2Refiner(small_config(max_points_per_object=8))
    out = refiner(gauss, nodes)
    assert out.points.tolist() == [8, 8]
