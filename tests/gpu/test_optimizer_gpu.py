"""The trainer's Adam on CUDA: fused, with the for-each implementation's update."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.engine.trainer import AdamConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fused_adam_matches_the_foreach_update():
    torch.manual_seed(0)
    start = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdamConfig(lr=1e-2, eps=1e-15, fused=fused).setup(params)
        assert bool(opt.param_groups[0]["fused"]) is fused
        for step in range(5):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
        runs[fused] = params
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
