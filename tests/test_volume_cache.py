"""The sparse volume's index-pair cache (:mod:`evolsplat_ns.model.volume_cache`) on CPU.

Cached pairs give the same features and weight gradients as fresh ones, with no spconv pair build;
``volume_from "anchors"`` reuses the cache on the next step while ``"current"`` rebuilds once the
offset cache moved; the cache is never persisted and goes with its segment.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from evolsplat_ns.data.types import SegmentKey
from evolsplat_ns.model.node import GaussianNode
from evolsplat_ns.model.predictor import GaussianPredictor, PredictorConfig
from evolsplat_ns.model.segment_store import SegmentState, SegmentStore
from evolsplat_ns.model.sparse_volume import SparseCostRegNet, voxelize
from evolsplat_ns.model.volume_cache import VolumeIndexCache, counted_pair_builds
from test_model_parts import make_cloud, make_views


def weight_grads(net: SparseCostRegNet, features: torch.Tensor, out_grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``(features * out_grad).sum()`` to every parameter of ``net`` (then zeroed)."""
    net.zero_grad(set_to_none=True)
    (features * out_grad).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return grads


def test_cached_pairs_give_the_fresh_features_and_gradients():
    torch.manual_seed(0)
    cloud = make_cloud(2000)
    net = SparseCostRegNet(3, 8)
    grid = voxelize(cloud.points, cloud.colors, 0.1)
    with counted_pair_builds() as builds:
        fresh, pairs = net.run(grid)
    assert builds[0] == 7  # 4 SubM + 3 strided layers; the inverse layers reuse the strided ones'
    assert sorted(pairs.by_key) == ["down1", "down2", "down3", "subm0", "subm1", "subm2", "subm3"]
    out_grad = torch.randn_like(fresh)
    fresh_grads = weight_grads(net, fresh, out_grad)
    with counted_pair_builds() as builds:
        cached, _ = net.run(grid, pairs)
        cached_grads = weight_grads(net, cached, out_grad)
    assert builds[0] == 0
    torch.testing.assert_close(cached, fresh, rtol=1e-6, atol=1e-6)
    for a, b in zip(cached_grads, fresh_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pairs_of_another_voxel_set_are_refused():
    net = SparseCostRegNet(3, 8)
    a, b = make_cloud(500, seed=0), make_cloud(300, seed=1)
    _, pairs = net.run(voxelize(a.points, a.colors, 0.1))
    with pytest.raises(ValueError, match="index pairs"):
        net.run(voxelize(b.points, b.colors, 0.1), pairs)


def predictor_and_node(volume_from: str) -> tuple[GaussianPredictor, GaussianNode]:
    torch.manual_seed(0)
    return GaussianPredictor(PredictorConfig(volume_from=volume_from, background_points=64)), \
        GaussianNode.from_point_cloud(make_cloud(400))


def move_offsets(node: GaussianNode, metres: float = 0.07) -> None:
    """What a training step does to the node: new offsets (in place), here ``metres`` on every axis."""
    node.update_offset(torch.arange(len(node)), torch.full((len(node), 3), metres))


def test_anchors_hit_the_cache_on_the_second_step():
    predictor, node = predictor_and_node("anchors")
    cache = VolumeIndexCache()
    move_offsets(node, -0.07)
    first = predictor.build_volume(node, cache)
    assert torch.equal(first.grid.origin, node.means.min(dim=0).values)  # the anchors', not the moved means'
    move_offsets(node, 0.05)
    with counted_pair_builds() as builds:
        second = predictor.build_volume(node, cache)
    assert (cache.misses, cache.hits, builds[0]) == (1, 1, 0)
    assert second.grid is first.grid
    torch.testing.assert_close(second.features, predictor.build_volume(node).features, rtol=1e-6, atol=1e-6)
    state = predictor.encode(node, make_views([-0.5, 0.0, 0.5]), volume_cache=cache)
    assert cache.hits == 2  # and the volume is sampled at the current means, as with "current"
    torch.testing.assert_close(state.volume_feat, state.volume.sample(node.current_means()))


def test_current_rebuilds_once_the_offsets_moved():
    predictor, node = predictor_and_node("current")
    predictor.config.volume_refresh_every = 1  # exact: every step (the default; N > 1 lags, below)
    cache = VolumeIndexCache()
    predictor.build_volume(node, cache)
    move_offsets(node)
    second = predictor.build_volume(node, cache)
    assert (cache.misses, cache.hits) == (2, 0)
    fresh = predictor.build_volume(node)
    torch.testing.assert_close(second.grid.origin, node.current_means().min(dim=0).values)
    assert torch.equal(second.grid.keys, fresh.grid.keys)
    torch.testing.assert_close(second.features, fresh.features, rtol=1e-6, atol=1e-6)
    predictor.build_volume(node, cache)  # nothing moved since (e.g. renders between steps): a hit
    assert cache.hits == 1
    predictor.volume_net.eval()  # eval-mode pairs may differ (implicit GEMM): not served to it
    predictor.build_volume(node, cache)
    assert (cache.misses, cache.hits) == (3, 1)


def test_current_with_refresh_every_reuses_the_voxel_set_while_the_offsets_move():
    predictor, node = predictor_and_node("current")
    predictor.config.volume_refresh_every = 3
    cache = VolumeIndexCache()
    first = predictor.build_volume(node, cache)
    for step in range(2):  # two steps on the first voxel set, no pair build
        move_offsets(node, 0.02 * (step + 1))
        with counted_pair_builds() as builds:
            stale = predictor.build_volume(node, cache)
        assert builds[0] == 0 and stale.grid is first.grid
    assert (cache.misses, cache.hits, cache.stale_hits) == (1, 0, 2)
    # the U-Net runs on the old set: its features are the fresh run's on that grid
    torch.testing.assert_close(stale.features, predictor.volume_net(first.grid), rtol=1e-6, atol=1e-6)
    move_offsets(node, 0.07)
    third = predictor.build_volume(node, cache)  # the third move rebuilds from the moved means
    assert (cache.misses, cache.stale_hits) == (2, 2) and third.grid is not first.grid
    assert torch.equal(third.grid.keys, predictor.build_volume(node).grid.keys)
    node.features_dc.add_(0.1)  # a change outside the offsets is never served stale
    predictor.build_volume(node, cache)
    assert cache.misses == 3


def test_volume_refresh_every_is_validated():
    with pytest.raises(ValueError, match="volume_refresh_every"):
        GaussianPredictor(PredictorConfig(volume_refresh_every=0))


def test_volume_from_is_validated():
    with pytest.raises(ValueError, match="volume_from.*'current' or 'anchors'"):
        GaussianPredictor(PredictorConfig(volume_from="means"))


def cached_state(seed: int = 0) -> SegmentState:
    """A segment state whose volume cache holds an entry."""
    predictor, _ = predictor_and_node("anchors")
    state = SegmentState(GaussianNode.from_point_cloud(make_cloud(300, seed)))
    predictor.build_volume(state.node, state.volume_cache)
    assert state.volume_cache
    return state


def test_volume_cache_is_persisted_unbound_and_counted():
    state = cached_state()
    assert state.volume_cache.nbytes() > 0
    assert state.nbytes() == state.node.nbytes() + state.volume_cache.nbytes()
    assert set(state.state_dict()) == {"node", "actors", "frozen_volume", "motion", "volume_cache"}
    loaded = SegmentState.from_state_dict(state.state_dict())
    for name in ("coords", "keys", "features", "origin"):
        a, b = getattr(loaded.volume_cache.grid, name), getattr(state.volume_cache.grid, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    older = state.state_dict()
    del older["volume_cache"]  # a checkpoint of an earlier version
    assert not SegmentState.from_state_dict(older).volume_cache
    grid = state.volume_cache.grid
    state.to("cpu")  # where it is already: kept as is (set_context activates the segment every step)
    assert state.volume_cache.grid is grid
    state.to("meta")  # another device: the voxel set moves with the node
    assert state.volume_cache.grid.coords.device.type == "meta"


def test_a_resumed_voxel_set_makes_the_uninterrupted_choices():
    """refresh_every 3: a checkpoint after one stale build; the resumed cache (new node tensors)
    serves the second stale build from the saved set without voxelising, then rebuilds where the
    uninterrupted cache does, with the same features at every build."""
    def run(resume_after: int | None) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        predictor, node = predictor_and_node("current")
        predictor.config.volume_refresh_every = 3
        state = SegmentState(node)
        out = []
        for step in range(5):
            if step == resume_after:
                state = SegmentState.from_state_dict(state.state_dict())  # as a checkpoint round trip
            c = state.volume_cache
            out.append((predictor.build_volume(state.node, c).features, (c.misses, c.hits, c.stale_hits)))
            move_offsets(state.node, 0.01 * (step + 1))
        return out

    straight, resumed = run(None), run(2)
    assert [n for _, n in straight] == [(1, 0, 0), (1, 0, 1), (1, 0, 2), (2, 0, 2), (2, 0, 3)]
    assert [n for _, n in resumed][2:] == [(0, 0, 1), (1, 0, 1), (1, 0, 2)]  # counters restart, choices do not
    for (a, _), (b, _) in zip(straight, resumed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_volume_cache_goes_with_a_spilled_segment(tmp_path):
    a, state = SegmentKey("s", 0), cached_state()
    keys = state.volume_cache.grid.keys.clone()
    ref = weakref.ref(state.volume_cache)
    store = SegmentStore(max_resident_mb=1e-6, spill_dir=tmp_path)  # every inactive segment spills
    store.put(a, state)
    del state
    gc.collect()
    assert store.spills == 1 and ref() is None
    assert torch.equal(store.get(a).volume_cache.grid.keys, keys)  # read back with its voxel set


def test_volume_cache_stays_with_a_segment_left_and_goes_when_forgotten(tmp_path):
    a, b = SegmentKey("s", 0), SegmentKey("s", 1)
    store = SegmentStore(spill_dir=tmp_path)
    first, second = store.put(a, cached_state(0)), store.put(b, cached_state(1))
    store.activate(a, "cpu")
    grid = first.volume_cache.grid
    store.activate(b, "cpu")
    assert first.volume_cache.grid is grid and second.volume_cache  # kept: its next build decides
    ref = weakref.ref(second.volume_cache)
    del first, second
    store.forget()
    gc.collect()
    assert ref() is None
