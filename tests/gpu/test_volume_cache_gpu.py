"""The sparse volume's index-pair cache on CUDA (spconv's implicit-GEMM pairs): the fresh and the
CPU features and gradients, and a cached build with no host sync."""

from __future__ import annotations

import copy

import pytest
import torch

from evolsplat_ns.model.volume_cache import VolumeIndexCache, counted_pair_builds
from test_volume_cache import move_offsets, predictor_and_node, weight_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cached_build_on_cuda_matches_fresh_and_cpu_without_a_sync():
    predictor, node = predictor_and_node("anchors")
    reference = predictor.build_volume(node).features  # CPU, native algorithm
    predictor, node = copy.deepcopy(predictor).cuda(), copy.deepcopy(node).to("cuda")
    cache = VolumeIndexCache()
    fresh = predictor.build_volume(node, cache)
    out_grad = torch.randn_like(fresh.features)
    fresh_grads = weight_grads(predictor.volume_net, fresh.features, out_grad)
    move_offsets(node)
    torch.cuda.synchronize()
    with counted_pair_builds() as builds:
        torch.cuda.set_sync_debug_mode("error")
        try:
            cached = predictor.build_volume(node, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert (cache.hits, builds[0]) == (1, 0)
    torch.testing.assert_close(cached.features, fresh.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.features.cpu(), reference, rtol=1e-3, atol=1e-3)
    for a, b in zip(weight_grads(predictor.volume_net, cached.features, out_grad), fresh_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
