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


def test_fused_adam_skips_a_flagged_step_on_the_device_without_a_sync():
    """``nonfinite_check="deferred"``'s skip: fused Adam reads ``found_inf`` on the device."""
    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda"))]
    opt = AdamConfig(lr=1e-2, eps=1e-15).setup(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()  # moments exist
    before = params[0].detach().clone(), {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.found_inf = (~torch.isfinite(params[0].grad.sum())).float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del opt.found_inf
    assert torch.equal(params[0].detach(), before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[params[0]].items())
