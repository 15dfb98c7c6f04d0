"""The sources warped at infinity (``model/sky_warp.py``) on CUDA: the CPU result, and no host sync."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model.sky_warp import warp_at_infinity

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_matches_cpu_without_a_sync():
    g = torch.Generator().manual_seed(0)
    S, H, W = 4, 64, 96
    images = torch.rand(S, H, W, 3, generator=g)
    # Sky above a horizon row per source, as real masks are: regions, not per-pixel noise.
    horizon = torch.tensor([20.0, 26.0, 31.0, 24.0])[:, None, None]
    sky = (torch.arange(H)[None, :, None].float() < horizon).expand(S, H, W).contiguous()
    K = torch.tensor([[80.0, 0, W / 2], [0, 80.0, H / 2], [0, 0, 1]]).expand(S, 3, 3).contiguous()
    angles = torch.tensor([0.0, 0.5, -0.5, 1.2])
    c2w = torch.eye(4).repeat(S, 1, 1)
    c2w[:, 0, 0], c2w[:, 0, 2], c2w[:, 2, 0], c2w[:, 2, 2] = angles.cos(), angles.sin(), -angles.sin(), angles.cos()
    target = c2w[1].clone()
    target[:3, 3] = torch.tensor([5.0, 0.0, 3.0])
    ref = warp_at_infinity(images, K, c2w, target, K[0], W, H, sky)
    dev = [t.cuda() for t in (images, K, c2w, target, sky)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rgb, weight = warp_at_infinity(dev[0], dev[1], dev[2], dev[3], dev[1][0], W, H, dev[4])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The colour where the coverage tends to 0 is a ratio of vanishing sums (rounding decides it);
    # what the composite uses is the colour times its coverage (a lerp towards the dome).
    torch.testing.assert_close(weight.cpu(), ref[1], atol=1e-3, rtol=0)
    torch.testing.assert_close((rgb * weight[..., None]).cpu(), ref[0] * ref[1][..., None], atol=2e-3, rtol=0)
