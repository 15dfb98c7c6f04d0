"""Tests of the neural core: nodes, sparse volume, spconv CPU fixes, projector, heads, predictor.

Scenes are generated: OpenCV cameras with identity rotation (looking along segment +z) and points a
few metres in front of them, 32x24 images.
"""

from __future__ import annotations

import copy

import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F

from evolsplat_ns.data.types import PointCloud, Views
from evolsplat_ns.model.node import GaussianNode, knn_mean_distance, rgb_to_sh0
from evolsplat_ns.model.predictor import GaussianPredictor, PredictorConfig
from evolsplat_ns.model.projector import Projector
from evolsplat_ns.model.sparse_volume import SparseCostRegNet, SparseVolume, build_volume, voxelize
from evolsplat_ns.model.spconv_compat import spconv_device_guard

W, H = 32, 24


def make_views(xs: list[float], focal: float = 20.0, depths: torch.Tensor | None = None, seed: int = 0) -> Views:
    """OpenCV cameras at (x, 0, 0) looking along segment +z, random images."""
    n = len(xs)
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, 0, 3] = torch.tensor(xs)
    K = torch.tensor([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1.0]]).repeat(n, 1, 1)
    images = torch.rand(n, H, W, 3, generator=torch.Generator().manual_seed(seed))
    return Views(images, K, c2w, torch.arange(n), torch.zeros(n, dtype=torch.long), depths=depths)


def make_cloud(n: int = 300, seed: int = 0) -> PointCloud:
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g) * torch.tensor([4.0, 3.0, 3.0]) + torch.tensor([-2.0, -1.5, 4.0])
    return PointCloud(pts, torch.rand(n, 3, generator=g))


# ----------------------------------------------------------------------------------------- nodes


def test_knn_scale_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    pts = torch.cat([torch.rand(400, 3, generator=g) * 5, torch.rand(100, 3, generator=g) * 0.05, torch.rand(5, 3) * 80])
    pts = torch.cat([pts, pts[:3]])  # exact duplicates
    full = torch.cdist(pts, pts, compute_mode="donot_use_mm_for_euclid_dist")
    ref = full.sort(dim=1).values[:, 1:4].mean(dim=1)
    assert torch.allclose(knn_mean_distance(pts), ref, atol=1e-6)


def test_node_from_point_cloud_and_state_dict():
    pc = make_cloud(50)
    node = GaussianNode.from_point_cloud(pc, scale_init="knn")
    assert torch.equal(node.means, pc.points)
    assert torch.allclose(node.features_dc, rgb_to_sh0(pc.colors)) and torch.allclose(node.rgb(), pc.colors, atol=1e-6)
    assert node.offset.abs().sum() == 0
    assert torch.allclose(node.scales[:, 0].exp(), knn_mean_distance(pc.points).clamp(1e-3, 1.0))
    fixed = GaussianNode.from_point_cloud(pc, scale_init=0.05)
    assert torch.allclose(fixed.scales.exp(), torch.full((50, 3), 0.05))
    node.update_offset(torch.tensor([0, 2]), torch.ones(2, 3))
    assert torch.equal(node.current_means()[2], pc.points[2] + 1)
    restored = GaussianNode.from_state_dict(copy.deepcopy(node.state_dict()))
    assert torch.equal(restored.offset, node.offset)
    with pytest.raises(ValueError, match="scale_init"):
        GaussianNode.from_point_cloud(pc, scale_init="nope")


# ------------------------------------------------------------------------------------ sparse volume


def two_voxel_volume() -> SparseVolume:
    """Voxels (0,0,0) and (1,0,0) of edge 1 m at origin 0, features 1 and 3 (all channels)."""
    grid = voxelize(torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.3, 0.3]]), torch.zeros(2, 3), 1.0)
    return SparseVolume(grid, torch.tensor([[1.0, 10.0], [3.0, 30.0]], requires_grad=True))


def test_volume_net_output_shape_and_sampling():
    torch.manual_seed(0)
    pc = make_cloud(300)
    vol = build_volume(SparseCostRegNet(3, 32), pc.points, pc.colors, 0.1)
    assert vol.features.shape == (vol.grid.keys.shape[0], 32)
    assert vol.sample(pc.points).shape == (300, 32)
    centres = vol.grid.origin + (vol.grid.coords + 0.5) * vol.grid.voxel_size
    assert torch.allclose(vol.sample(centres), vol.features, atol=1e-4)  # float32 rounding of centres


def test_volume_sample_trilinear_and_missing_neighbours():
    vol = two_voxel_volume()
    assert torch.equal(vol.grid.coords, torch.tensor([[0, 0, 0], [1, 0, 0]]))
    q = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.5, 0.5], [0.75, 0.5, 0.5], [0.5, 0.9, 0.2], [9.0, 9.0, 9.0]])
    out = vol.sample(q)
    expected = torch.tensor([[1.0, 10.0], [2.0, 20.0], [1.5, 15.0], [1.0, 10.0], [0.0, 0.0]])
    assert torch.allclose(out, expected)
    out[2, 0].backward()
    assert torch.allclose(vol.features.grad[:, 0], torch.tensor([0.75, 0.25]))


# ---------------------------------------------------------------------------------- spconv on CPU


def test_spconv_cpu_backward_matches_dense_conv3d():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    D = 6
    coords = (torch.rand(D, D, D, generator=g) < 0.4).nonzero()
    feats = torch.randn(coords.shape[0], 2, generator=g, dtype=torch.float64, requires_grad=True)
    conv = spconv.SubMConv3d(2, 3, 3, padding=1, bias=False).double()
    with spconv_device_guard(torch.device("cpu"), conv):
        x = spconv.SparseConvTensor(feats, F.pad(coords, (1, 0)).int(), [D, D, D], 1)
        out = conv(x).features
    assert torch.get_num_threads() == 2
    out_grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * out_grad).sum().backward()

    dense_feats = feats.detach().clone().requires_grad_(True)
    grid = torch.zeros(D, D, D, 2, dtype=torch.float64).index_put((coords[:, 0], coords[:, 1], coords[:, 2]), dense_feats)
    weight = conv.weight.detach().clone().requires_grad_(True)  # [out, k, k, k, in]
    dense_out = F.conv3d(grid.permute(3, 0, 1, 2)[None], weight.permute(0, 4, 1, 2, 3), padding=1)[0]
    dense_at_sites = dense_out[:, coords[:, 0], coords[:, 1], coords[:, 2]].T
    assert torch.allclose(out, dense_at_sites)
    (dense_at_sites * out_grad).sum().backward()
    assert torch.allclose(feats.grad, dense_feats.grad)
    assert torch.allclose(conv.weight.grad, weight.grad)
    assert torch.get_num_threads() == 2


def test_spconv_thread_workaround_is_deterministic():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    pts = torch.rand(6000, 3) * torch.tensor([6.0, 6.0, 2.0])
    net = SparseCostRegNet(3, 16).eval()
    grid = voxelize(pts, torch.rand(6000, 3), 0.1)
    with torch.no_grad():
        runs = [net(grid) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------- projector


def test_projector_samples_known_pixel_and_validity():
    views = make_views([0.0])
    proj = Projector(local_radius=1)
    z = 5.0
    u, v = 7.5, 5.5  # centre of pixel (col 7, row 5)
    point = torch.tensor([[(u - W / 2) * z / 20.0, (v - H / 2) * z / 20.0, z], [0.0, 0.0, -3.0], [100.0, 0.0, 5.0]])
    out = proj.sample(point, views)
    window = views.images[0, 4:7, 6:9].reshape(9, 3)  # rows 4..6, cols 6..8, row-major
    assert out.colors.shape == (3, 1, 9, 3)
    assert torch.allclose(out.colors[0, 0], window, atol=1e-5)
    assert out.valid[:, 0].tolist() == [True, False, False]
    assert out.keep.tolist() == [True, False, False]


def test_projector_occlusion_sign():
    ray = torch.tensor([[0.1, 0.1, 5.0], [0.2, 0.2, 10.0]])  # same pixel, second one hidden
    out = Projector().sample(ray, make_views([0.0]))  # no depth maps: point z-buffer
    assert out.occlusion[0, 0, 0].item() == pytest.approx(0.0)
    assert out.occlusion[1, 0, 0].item() == pytest.approx(5.0)
    depth = torch.full((1, H, W), 6.0)
    out = Projector().sample(ray, make_views([0.0], depths=depth))
    assert out.occlusion[:, 0, 0].tolist() == pytest.approx([-1.0, 4.0])


def test_projector_selects_nearest_cameras():
    views = make_views([0.0, 1.0, 2.0, 5.0, -3.0, 1.0])
    turned = torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # camera 1 looks along segment -x
    views.camtoworlds[1, :3, :3] = turned
    target = torch.eye(4)
    target[0, 3] = 0.9
    idx = Projector(num_neighbour_select=4).select_views(target, views.camtoworlds)
    assert idx.tolist() == [5, 1, 0, 2]


# ---------------------------------------------------------------------------------------- predictor


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    node = GaussianNode.from_point_cloud(make_cloud(300, seed))
    source = make_views([-0.5, 0.0, 0.5], seed=seed)
    cfg = PredictorConfig(num_neighbour_select=2, background_points=64)
    return GaussianPredictor(cfg), node, source


def targets() -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for x in (-0.3, 0.4):
        c2w = torch.eye(4)
        c2w[0, 3] = x
        out.append((c2w, torch.tensor([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]])))
    return out


def surrogate_loss(params, weight: float) -> torch.Tensor:
    """Smooth stand-in for a rendering loss touching every predicted attribute."""
    return weight * (
        params.means.sin().sum()
        + params.sh.square().sum()
        + params.scales.sum()
        + (params.quats[:, 1:] * params.means).sum()
        + params.opacities.square().sum()
    )


def test_predictor_end_to_end_shapes():
    model, node, source = tiny_setup()
    state = model.encode(node, source)
    c2w, K = targets()[0]
    p = model.predict(state, c2w, K)
    m = p.index.shape[0]
    assert 0 < m <= len(node)
    assert p.means.shape == (m, 3) and p.quats.shape == (m, 4) and p.scales.shape == (m, 3)
    assert p.opacities.shape == (m,) and p.sh.shape == (m, 4, 3) and p.offset.shape == (m, 3)
    for t in (p.means, p.quats, p.scales, p.opacities, p.sh):
        assert torch.isfinite(t).all()
    assert torch.allclose(p.quats.norm(dim=-1), torch.ones(m), atol=1e-5)
    assert (p.scales > 0).all() and ((p.opacities > 0) & (p.opacities < 1)).all()
    assert (p.offset.abs() <= model.config.offset_max).all()
    assert torch.allclose(p.means, node.means[p.index] + p.offset)
    bg = model.predict_background(state)
    assert bg.means.shape == (64, 3) and bg.sh.shape == (64, 4, 3) and torch.isfinite(bg.sh).all()
    node.update_offset(p.index, p.offset)
    assert torch.equal(node.offset[p.index], p.offset)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_every_head_and_split_backward_matches_combined():
    model, node, source = tiny_setup()
    model.eval()  # fixed BN statistics: both passes then compute the same function

    state = model.encode(node, source)
    for i, (c2w, K) in enumerate(targets()):
        loss = surrogate_loss(model.predict(state, c2w, K), 1.0 + i)
        loss = loss + model.predict_background(state).sh.square().sum()
        loss.backward()  # no retain_graph: each target frees its own graph
    state.backward_shared()
    split = _grads(model)

    model.zero_grad()
    state = model.encode(node, source, split_backward=False)
    total = sum(
        surrogate_loss(model.predict(state, c2w, K), 1.0 + i) + model.predict_background(state).sh.square().sum()
        for i, (c2w, K) in enumerate(targets())
    )
    total.backward()
    combined = _grads(model)

    for name in ("volume_net", "color_head", "scale_rotation_head", "opacity_head", "offset_head", "background"):
        module_grads = [g for n, g in split.items() if n.startswith(name)]
        assert module_grads and any(g.abs().sum() > 0 for g in module_grads), name
    assert split.keys() == combined.keys()
    for name in split:
        assert torch.allclose(split[name], combined[name], rtol=1e-4, atol=1e-6), name


def test_frozen_volume_cache_reused_and_checkpointed():
    from evolsplat_ns.data.types import SegmentKey
    from evolsplat_ns.model.segment_store import SegmentState, SegmentStore

    model, node, source = tiny_setup()
    store, key = SegmentStore(), SegmentKey("scene", 0)
    segment = store.put(key, SegmentState(node, frozen_volume=model.build_volume(node).detach()))
    first = model.encode(node, source, volume=store.get(key).frozen_volume)
    second = model.encode(node, source, volume=store.get(key).frozen_volume)
    assert key in store and second.volume is first.volume is segment.frozen_volume
    assert not second.volume.features.requires_grad
    c2w, K = targets()[0]
    surrogate_loss(model.predict(second, c2w, K), 1.0).backward()
    second.backward_shared()  # only the offset head lies behind the boundary now
    assert model.offset_head.net[0].weight.grad is not None and model.volume_net.stem[0].weight.grad is None
    other = SegmentStore()
    other.load_state_dict(copy.deepcopy(store.state_dict()))
    restored = other.get(key).frozen_volume
    assert torch.equal(restored.features, first.volume.features)
    assert torch.equal(restored.sample(node.means), first.volume.sample(node.means))


def test_geometry_heads_side_by_side_give_each_heads_own_outputs_and_gradients():
    """ViewDecoder evaluates the scale/rotation and opacity heads as one MLP (stacked first layers,
    block-diagonal second layers): the same outputs and parameter gradients as each head alone."""
    from evolsplat_ns.model.heads import ColorHead, OpacityHead, ScaleRotationHead, ViewDecoder, view_features

    torch.manual_seed(0)
    C, M = 12, 50
    decoder = ViewDecoder(ColorHead(window_size=4, volume_dim=C), ScaleRotationHead(C, hidden=16),
                          OpacityHead(C, hidden=16)).double()
    image_feat, volume_feat = torch.randn(M, 2 * (3 * 4 + 1)).double(), torch.randn(M, C).double()
    means, anchor_dc, base_log_scale = torch.randn(M, 3).double() * 5, torch.rand(M, 3).double(), -torch.rand(M, 3).double()
    c2w, K = torch.eye(4).double(), torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]]).double()
    sh, scales, quats, opacities = decoder(image_feat, volume_feat, means, c2w, K, anchor_dc, base_log_scale)
    view_feat = view_features(means, c2w, K)
    ref_scales, ref_quats = decoder.scale_rotation(volume_feat, view_feat, base_log_scale)
    ref_opacities = decoder.opacity(volume_feat, view_feat)
    for got, ref in ((scales, ref_scales), (quats, ref_quats), (opacities, ref_opacities)):
        torch.testing.assert_close(got, ref)
    params = list(decoder.scale_rotation.parameters()) + list(decoder.opacity.parameters())
    weights = torch.randn(M, 3).double(), torch.randn(M, 4).double(), torch.randn(M).double()
    fused = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (scales, quats, opacities))), params)
    alone = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (ref_scales, ref_quats, ref_opacities))), params)
    for got, ref in zip(fused, alone):
        torch.testing.assert_close(got, ref)
    assert all(g.abs().sum() > 0 for g in fused)
