"""``render_targets`` (every target of a step in one draw, ``batch_targets``) renders what one
``render`` per target does, with each background setting (CPU reference renderer, 3 targets)."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.data.types import Views
from test_cuda_graphs import H, W, render_setup, target_pose

KEYS = ("rgb", "depth", "accumulation", "background_rgb")


@pytest.mark.parametrize("config", [{}, {"background_source": "dome"}, {"enable_background": False}],
                         ids=["sources", "dome", "none"])
def test_render_targets_equals_one_render_per_target(config):
    model, state, K = render_setup(**config)
    poses = torch.stack([target_pose(x) for x in (-0.3, 0.1, 0.45)])  # different nearest sources
    targets = Views(torch.zeros(3, H, W, 3), K.repeat(3, 1, 1), poses, torch.arange(3), torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        outs = model.render_targets(state, targets)
        refs = [model.render(state, poses[v], K, W, H, time=float(v)) for v in range(3)]
    assert len(outs) == 3
    for out, ref in zip(outs, refs):
        assert torch.equal(out["gaussians"].index, ref["gaussians"].index)
        for key in KEYS:
            if ref[key] is None:
                assert out[key] is None, key
            else:
                torch.testing.assert_close(out[key], ref[key], atol=2e-5, rtol=1e-4, msg=key)
    assert not torch.allclose(outs[0]["rgb"], outs[2]["rgb"])
