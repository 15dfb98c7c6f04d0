"""Stage 2 restructured for fewer dispatched ops (issue 10): the same results as the readable forms."""

from __future__ import annotations

import pytest
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


def _trained_refiner(config, seed: int = 1):
    """A refiner whose zero-initialised last layers are randomised (so corrections are non-zero)."""
    from evolsplat_ns.model.stage2.refiner import Stage2Refiner

    torch.manual_seed(seed)
    refiner = Stage2Refiner(config)
    with torch.no_grad():
        for head in (refiner.gaussian_head, refiner.pose_head):
            head.out.weight.normal_(0, 0.3)
            head.out.bias.normal_(0, 0.3)
    return refiner


def _scene():
    """Toy actors seen by a camera looking along +x from 6 m behind them, and a flow field."""
    from test_stage2 import toy_actors

    gauss, nodes = toy_actors(K=2, n=20, F=4)
    nodes.poses[:, :, 0, 3] += 8.0  # in front of the camera
    K = torch.tensor([[40.0, 0, 16], [0, 40, 12], [0, 0, 1]])
    w2c = torch.eye(4)
    w2c[:3, :3] = torch.tensor([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]])
    return gauss, nodes, K, w2c


def test_flow_consistency_of_views_at_once_equals_one_view_at_a_time():
    from evolsplat_ns.model.stage2.loss import flow_consistency_objects, flow_consistency_views

    gauss, nodes, K, w2c = _scene()
    g = torch.Generator().manual_seed(3)
    T, H, W = 3, 24, 32
    flows = torch.randn(T, H, W, 2, generator=g) * 2
    cols = [0, 1, 2]
    w2c_t = torch.stack([w2c] * T)
    w2c_t1 = w2c_t.clone()
    w2c_t1[:, 1, 3] = torch.tensor([0.1, -0.2, 0.3])  # the camera moves between frames
    rows = torch.tensor([[True, True], [True, False], [False, True]])
    poses = nodes.poses
    batched = flow_consistency_views(gauss.means, gauss.actor, poses[:, cols].transpose(0, 1),
                                     poses[:, [c + 1 for c in cols]].transpose(0, 1), rows, K.expand(T, 3, 3),
                                     w2c_t, w2c_t1, flows)
    single = torch.stack([flow_consistency_objects(gauss.means, gauss.actor, poses[:, c], poses[:, c + 1], rows[i], K,
                                                   w2c_t[i], w2c_t1[i], flows[i]) for i, c in enumerate(cols)])
    assert (batched > 0).all()
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-7)


def test_gaussian_reg_equals_the_per_slice_sum():
    from evolsplat_ns.model.stage2.heads import GAUSSIAN_OUTPUT_LAYOUT
    from evolsplat_ns.model.stage2.loss import DELTA_REG_WEIGHTS, gaussian_reg

    delta = torch.randn(30, 13, dtype=torch.float64)
    rows = torch.rand(30) < 0.6
    expected = sum(w * delta[rows][:, GAUSSIAN_OUTPUT_LAYOUT[s]].pow(2).sum(-1).mean()
                   for s, w in DELTA_REG_WEIGHTS.items())
    assert torch.allclose(gaussian_reg(delta, rows), expected, rtol=1e-12)


def test_refined_quaternions_are_the_corrected_pose_rotations_and_rendering_uses_them(monkeypatch):
    from test_stage2 import small_config

    from evolsplat_ns import geometry
    from evolsplat_ns.model.actors import place_actors

    gauss, nodes, _, _ = _scene()
    out = _trained_refiner(small_config())(gauss, nodes)
    assert out.xi.abs().max() > 1e-3, "a real correction"
    assert (geometry.quat_to_matrix(out.quats) - out.poses[..., :3, :3]).abs().max() < 1e-5
    assert (out.quats[..., 0] >= 0).all()
    refined = nodes.with_poses(out.poses, out.quats)
    expected = place_actors(out.gaussians, nodes.with_poses(out.poses), 2.0)  # converts the matrices
    monkeypatch.setattr("evolsplat_ns.model.actors.matrix_to_quat",
                        lambda R: pytest.fail("refined rotations converted from matrices again"))
    placed = place_actors(out.gaussians, refined, 2.0)
    assert torch.allclose(placed.means, expected.means)
    same_rotation = geometry.quat_to_matrix(placed.quats) - geometry.quat_to_matrix(expected.quats)
    assert same_rotation.abs().max() < 1e-5


def test_a_run_scores_consistency_of_all_targets_as_the_per_target_sum():
    """The consistency term, computed once at finish for every target scored with flow, is the
    per-target terms' sum (each divided by the target count), and its gradient reaches the refiner."""
    from test_stage2 import small_config

    from evolsplat_ns.model.stage2.loss import Stage2CompleteLoss, flow_consistency_objects
    from evolsplat_ns.model.stage2.step import FlowView, Stage2Step

    gauss, nodes, K, w2c = _scene()
    config = small_config()
    refiner, loss = _trained_refiner(config), Stage2CompleteLoss(config)
    H, W = 24, 32
    g = torch.Generator().manual_seed(5)
    views = [FlowView(torch.randn(H, W, 2, generator=g), c, K, w2c, w2c) for c in (0, 2, 1)]
    outputs = {"rgb": torch.rand(H, W, 3, requires_grad=True), "depth": torch.rand(H, W, 1) + 1,
               "accumulation": torch.rand(H, W, 1)}
    step2 = Stage2Step(refiner, loss, gauss, nodes, split_backward=True)
    for view in views:
        terms = step2.target_terms(outputs, torch.rand(H, W, 3), None, 0, len(views), view)
        sum(terms.values()).backward()
    step2.finish(lambda total: total.backward())
    report = step2.report()
    with torch.no_grad():
        out = refiner(gauss, nodes)
        valid = nodes.valid
        expected = sum(config.consistency_loss_weight * flow_consistency_objects(
            out.gaussians.means, out.gaussians.actor, out.poses[:, v.col], out.poses[:, v.col + 1],
            valid[:, v.col] & valid[:, v.col + 1], K, w2c, w2c, v.flow) / len(views) for v in views)
    assert report.outcome == "ran" and report.terms["s2_consistency"] > 0
    assert abs(report.terms["s2_consistency"] - float(expected)) < 1e-6 * max(1.0, float(expected))
    assert refiner.pose_head.out.weight.grad is not None and refiner.pose_head.out.weight.grad.abs().sum() > 0
