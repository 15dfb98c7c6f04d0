"""Stage 2's batched refine heads: every refined object through each head in one padded, masked call
equals one call per object (``Stage2Refiner.forward_reference``): outputs and gradients, train and
eval mode, objects of different sizes (one point, one object, a point budget that subsamples)."""

from __future__ import annotations

import math

import pytest
import torch

from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.heads import GaussianRefineHead, PoseRefineHead
from evolsplat_ns.model.stage2 import refiner as R
from evolsplat_ns.model.stage2.processor import ObservedMotion
from evolsplat_ns.model.stage2.refiner import CHECKPOINT_ABOVE_BYTES, Stage2Refiner
from evolsplat_ns.model.stage2.se3 import se3_exp


def _config(**kw) -> Stage2Config:
    base = dict(enabled=True, gaussian_feature_dim=16, pose_feature_dim=16, gaussian_num_heads=2)
    return Stage2Config(**{**base, **kw})


def random_actors(counts: list[int], F: int = 6, seed: int = 0) -> tuple[ActorGaussians, ActorNodes, ObservedMotion]:
    """Actors with ``counts[k]`` Gaussians each (rows interleaved, not grouped), random box poses
    (object-to-segment), sizes and validity (each at least one valid frame), and random evidence."""
    g = torch.Generator().manual_seed(seed)
    K, N = len(counts), sum(counts)
    actor = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    actor = actor[torch.randperm(N, generator=g)]
    means = torch.rand(N, 3, generator=g) - 0.5
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    gauss = ActorGaussians(means, quats, torch.rand(N, 3, generator=g) * 0.1 + 0.01,
                           torch.rand(N, generator=g) * 0.8 + 0.1, torch.randn(N, 4, 3, generator=g), actor)
    twist = torch.randn(K, F, 6, generator=g) * torch.tensor([0.2, 0.2, 0.5, 3.0, 3.0, 0.3])
    poses = se3_exp(twist.reshape(-1, 6)).reshape(K, F, 4, 4)
    valid = torch.rand(K, F, generator=g) > 0.3
    valid[torch.arange(K), torch.randint(0, F, (K,), generator=g)] = True
    sizes = torch.rand(K, 3, generator=g) * torch.tensor([4.0, 1.5, 1.0]) + torch.tensor([1.0, 0.5, 0.5])
    nodes = ActorNodes(means, gauss.sh[:, 0], gauss.scales.log(), actor, torch.arange(F), poses, valid, sizes,
                       tuple(str(k) for k in range(K)))
    xi = torch.randn(K, F, 6, generator=g) * 0.05
    weight = (torch.rand(K, F, generator=g) > 0.5).float()
    motion = ObservedMotion(poses, poses.clone(), xi, weight, torch.zeros(K, F - 1, dtype=torch.bool),
                            torch.zeros(K, F - 1), torch.zeros(K, 2))
    return gauss, nodes, motion


def _trained_refiner(seed: int = 1, **kw) -> Stage2Refiner:
    """A refiner whose heads are off their (zero) init, so the outputs are not trivially equal."""
    torch.manual_seed(seed)
    refiner = Stage2Refiner(_config(**kw))
    for head in (refiner.gaussian_head, refiner.pose_head):
        torch.nn.init.normal_(head.out.weight, std=0.5)
        torch.nn.init.normal_(head.out.bias, std=0.1)
    return refiner


CASES = {
    "mixed sizes": [1, 7, 30, 1, 12],
    "one object": [9],
    "one object of one point": [1],
    "points over the budget": [40, 3, 25],
}


@pytest.fixture(params=[4.0, math.inf], ids=["size classes", "one call"])
def group_ratio(request, monkeypatch):
    monkeypatch.setattr(R, "GROUP_RATIO", request.param)
    return request.param


@pytest.mark.parametrize("counts", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batched_heads_equal_one_call_per_object(counts, train, group_ratio):
    gauss, nodes, motion = random_actors(counts)
    refiner = _trained_refiner(max_points_per_object=16)
    refiner.train(train)
    plan = refiner.plan(nodes)
    assert plan.batch.index.shape == (len(plan.rows), max(plan.splits)), "padded to the largest subset"
    assert sum(b.mask.shape[0] for b in plan.groups) == len(plan.rows)
    if group_ratio == math.inf:
        assert len(plan.groups) == 1
    with torch.no_grad():  # eval + no_grad takes torch's fused attention / encoder paths
        a, b = refiner(gauss, nodes, motion), refiner.forward_reference(gauss, nodes, motion)
    assert b.delta.abs().max() > 1e-3 and b.xi.abs().max() > 1e-3, "non-trivial outputs"
    assert torch.allclose(a.delta, b.delta, atol=1e-5), (a.delta - b.delta).abs().max()
    assert torch.allclose(a.xi, b.xi, atol=1e-5), (a.xi - b.xi).abs().max()
    assert torch.allclose(a.poses, b.poses, atol=1e-5)
    assert torch.equal(a.points, b.points) and torch.equal(a.refined, b.refined)
    outside = torch.ones(len(gauss.actor), dtype=torch.bool)
    outside[plan.index] = False
    assert torch.equal(a.delta[outside], torch.zeros_like(a.delta[outside])), "rows outside the budget untouched"


@pytest.mark.parametrize("mode", ["joint", "gaussian_only", "pose_only"])
def test_batched_gradients_equal_one_call_per_object(mode, group_ratio):
    counts = [1, 7, 30, 1, 12]
    refiner = _trained_refiner(max_points_per_object=16)
    refiner.mode = mode
    grads = []
    for path in (refiner.forward, refiner.forward_reference):
        gauss, nodes, motion = random_actors(counts)
        leaves = [t.requires_grad_(True) for t in (gauss.means, gauss.scales, gauss.sh)]
        refiner.zero_grad(set_to_none=True)
        out = path(gauss, nodes, motion)
        w = torch.Generator().manual_seed(3)
        loss = ((out.delta * torch.randn(out.delta.shape, generator=w)).sum()
                + (out.xi * torch.randn(out.xi.shape, generator=w)).sum()
                + (out.gaussians.means * torch.randn(out.gaussians.means.shape, generator=w)).sum())
        loss.backward()
        grads.append(([p.grad for p in refiner.parameters()], [t.grad for t in leaves]))
    (pa, la), (pb, lb) = grads
    n_grads = 0
    for x, y in zip(pa + la, pb + lb):
        assert (x is None) == (y is None)
        if x is not None:
            n_grads += 1
            assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), (x - y).abs().max()
    frozen = {"gaussian_only": refiner.pose_head, "pose_only": refiner.gaussian_head}.get(mode)
    if frozen is not None:
        assert all(p.grad is None for p in frozen.parameters()), "the head the mode does not run gets no gradient"
    assert n_grads > 3


def test_batched_refiner_is_exact_identity_at_init():
    gauss, nodes, motion = random_actors([1, 7, 30, 1, 12])
    out = Stage2Refiner(_config(max_points_per_object=16))(gauss, nodes, motion)
    for name in ("means", "quats", "scales", "opacities", "sh"):
        assert torch.equal(getattr(out.gaussians, name), getattr(gauss, name)), name
    assert torch.equal(out.poses, nodes.poses) and torch.equal(out.xi, torch.zeros_like(out.xi))


def test_padding_content_does_not_reach_the_real_rows():
    """Heads called directly: whatever sits in the padding rows, the real rows' outputs stay."""
    torch.manual_seed(0)
    gh, ph = GaussianRefineHead(feature_dim=16, num_heads=2), PoseRefineHead(pose_feature_dim=16, num_heads=2)
    torch.nn.init.normal_(gh.out.weight)
    torch.nn.init.normal_(ph.out.weight)
    g = torch.randn(3, 10, 14)
    mask = torch.arange(10)[None] < torch.tensor([[10], [4], [1]])
    poses = se3_exp(torch.randn(3 * 5, 6) * 0.3).reshape(3, 5, 4, 4)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    size = torch.tensor([[4.0, 2, 1.5], [1, 1, 1], [10, 3, 3]])
    noisy = torch.where(mask[..., None], g, torch.randn_like(g) * 100)
    for k in range(3):
        n = int(mask[k].sum())
        one = gh(g[k, :n])[0]
        assert torch.allclose(gh(noisy, mask=mask)[0][k, :n], one, atol=1e-5)
        xi = ph(g[k, :n], poses[k], valid[k], size[k])
        assert torch.allclose(ph(noisy, poses, valid, size, mask=mask)[k], xi, atol=1e-5)


def test_size_classes_split_where_an_object_is_much_smaller():
    assert R.size_classes([100, 2048, 30, 1900, 600], 4.0) == [[1, 3, 4], [0, 2]]
    assert R.size_classes([100, 2048, 30], math.inf) == [[0, 1, 2]]
    assert R.size_classes([1, 1, 1], 4.0) == [[0, 1, 2]]


def test_checkpoint_estimate_counts_the_padded_batch(monkeypatch):
    gauss, nodes, _ = random_actors([2, 40, 35])
    refiner = Stage2Refiner(_config(max_points_per_object=2048))
    c = refiner.config
    per_row = c.gaussian_feature_dim * c.gaussian_num_layers * 12 * 4
    plan = refiner.plan(nodes)
    assert plan.index.numel() == 77 and len(plan.groups) == 2
    assert plan.padded_points == 40 + 40 + 2 and refiner.activation_bytes(plan) == 82 * per_row
    monkeypatch.setattr(R, "GROUP_RATIO", math.inf)
    refiner = Stage2Refiner(_config(max_points_per_object=2048))
    assert refiner.activation_bytes(refiner.plan(nodes)) == 3 * 40 * per_row, "one call: every object padded to 40"
    # the standard preset's worst case (10 objects padded to 2048 points, 128 features) stays below the bound
    assert 10 * 2048 * 128 * 2 * 12 * 4 < CHECKPOINT_ABOVE_BYTES


def test_checkpointed_batched_head_gives_the_same_gradients(monkeypatch):
    gauss, nodes, motion = random_actors([1, 7, 30, 1, 12])
    refiner = _trained_refiner(max_points_per_object=16)
    grads = []
    for bound in (CHECKPOINT_ABOVE_BYTES, 0):  # 0: every run is checkpointed
        monkeypatch.setattr(R, "CHECKPOINT_ABOVE_BYTES", bound)
        assert refiner._checkpoint(refiner.plan(nodes)) == (bound == 0)
        refiner.zero_grad(set_to_none=True)
        out = refiner(gauss, nodes, motion)
        (out.delta.square().sum() + out.xi.square().sum()).backward()
        grads.append([p.grad.clone() for p in refiner.gaussian_head.parameters()])
    for x, y in zip(*grads):
        assert torch.allclose(x, y, atol=1e-6)
