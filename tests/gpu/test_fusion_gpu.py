"""The one draw with its work around gsplat compiled by inductor (``fuse_draw``) against eager:
images and gradients, at two row counts (the second compiles with a symbolic row count), with the
sources' sky blended; then a third count that must not compile again. Needs CUDA and Triton."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model.render import layers
from evolsplat_ns.model.render.layers import rasterize_layered
from evolsplat_ns.utils.fusion import fusion_available

from test_layered_gpu import H, W, _set

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and fusion_available(torch.device("cuda"))),
                       reason="needs CUDA and Triton"),
]


def _render(rows: int, compile_backend):
    front = _set(rows, (3.0, 12.0), 8.0, 0.15, (0.05, 0.5), rows)
    back = _set(300, (2.0, 40.0), 60.0, 4.0, (0.05, 0.3), 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    sky = (torch.rand(H, W, 3, device="cuda", generator=g), torch.rand(H, W, device="cuda", generator=g))
    K = torch.tensor([[300.0, 0.0, W / 2], [0.0, 300.0, H / 2], [0.0, 0.0, 1.0]], device="cuda")
    out = rasterize_layered(front, back, torch.eye(4, device="cuda"), K, W, H, sh_degree=1, sky=sky,
                            backend="gsplat", compile_backend=compile_backend)
    (out.rgb.square().sum() + 0.01 * out.depth.sum() + out.alpha.sum() + out.background.sum()).backward()
    grads = [getattr(s, f).grad for s in (front, back) for f in ("means", "quats", "scales", "opacities", "sh")]
    return out, grads


def test_inductor_one_draw_equals_eager():
    torch._dynamo.reset()
    frames = []
    for rows in (2000, 2345, 1777):
        (eager, ge), (fused, gf) = _render(rows, None), _render(rows, "inductor")
        for name in ("rgb", "depth", "alpha", "background"):
            diff = (getattr(fused, name) - getattr(eager, name)).abs()
            assert float(diff.max()) < 1e-4, f"{name}: max diff {float(diff.max()):.3g}, mean {float(diff.mean()):.3g}"
        for i, (a, b) in enumerate(zip(gf, ge)):
            err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
            assert err < 1e-3, f"gradient {i}: max diff {err:.3g} of its largest value"
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[1] == frames[2]  # the third row count reuses the symbolic compile
    assert not layers.PREPARE._failed and not layers.FINISH._failed
