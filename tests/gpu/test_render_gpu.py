"""The PyTorch reference renderer against gsplat's CUDA rasteriser on the same scene (needs CUDA).

Cameras are OpenCV (x right, y down, z forward); world-to-camera matrices are slightly shifted
and rotated copies of the identity, so Gaussians 3-12 m ahead fill most of the image.
"""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model.render import rasterize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (gsplat kernels)"),
]

W, H, N, C = 320, 240, 3000, 2


def _scene(sh_degree: int | None = None) -> list[torch.Tensor]:
    """[means, quats, scales, opacities, colors, viewmats, Ks] on CUDA, fixed seed."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(N, 3, generator=g) * torch.tensor([8.0, 6.0, 9.0]) + torch.tensor(
        [-4.0, -3.0, 3.0]
    )
    quats = torch.randn(N, 4, generator=g)
    scales = torch.rand(N, 3, generator=g) * 0.2 + 0.02
    opacities = torch.rand(N, generator=g) * 0.9 + 0.05
    if sh_degree is None:
        colors = torch.rand(N, 3, generator=g)
    else:
        colors = torch.randn(N, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    angle = torch.tensor(0.05)
    viewmats = torch.eye(4).repeat(C, 1, 1)
    viewmats[1, :3, :3] = torch.tensor(
        [[angle.cos(), 0.0, angle.sin()], [0.0, 1.0, 0.0], [-angle.sin(), 0.0, angle.cos()]]
    )
    viewmats[1, 0, 3] = -0.4
    Ks = torch.tensor([[300.0, 0.0, W / 2], [0.0, 300.0, H / 2], [0.0, 0.0, 1.0]]).repeat(C, 1, 1)
    return [t.cuda() for t in (means, quats, scales, opacities, colors, viewmats, Ks)]


def _render_both(scene, **kwargs):
    return [rasterize(*scene, W, H, backend=b, **kwargs) for b in ("reference", "gsplat")]


def _assert_images_agree(ref, fast) -> None:
    # Measured on an H200: mean differences ~1.5e-7, depth relative ~2e-7 (float rounding only).
    assert (ref.rgb - fast.rgb).abs().mean() < 1e-5
    assert (ref.alpha - fast.alpha).abs().mean() < 1e-5
    solid = (ref.alpha > 0.5) & (fast.alpha > 0.5)
    assert solid.float().mean() > 0.3  # the comparison covers a good part of the image
    rel = ((ref.depth - fast.depth).abs() / fast.depth)[solid]
    assert rel.median() < 1e-5 and rel.mean() < 1e-4


def test_auto_picks_gsplat_on_cuda():
    assert rasterize(*_scene(), W, H).meta["backend"] == "gsplat"


def test_reference_matches_gsplat_images():
    ref, fast = _render_both(_scene())
    vis_ref, vis_fast = ref.meta["visible"], fast.meta["visible"]
    assert (vis_ref == vis_fast).float().mean() > 0.999
    _assert_images_agree(ref, fast)


def test_reference_matches_gsplat_with_sh_and_background():
    bg = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 1.0]], device="cuda")
    ref, fast = _render_both(_scene(sh_degree=3), sh_degree=3, backgrounds=bg)
    _assert_images_agree(ref, fast)


def test_packed_layout_gives_the_same_images():
    scene = _scene()
    dense = rasterize(*scene, W, H, backend="gsplat")
    packed = rasterize(*scene, W, H, backend="gsplat", packed=True)
    torch.testing.assert_close(packed.rgb, dense.rgb, atol=1e-5, rtol=0)
    # gsplat 1.4.0's packed kernel clamps the eigenvalue term at 0.1 instead of 0.01: radii may
    # grow by a pixel, never shrink to culled.
    radius_change = packed.meta["radii"] - dense.meta["radii"]
    assert radius_change.min() >= 0 and radius_change.max() <= 1
    assert not (dense.meta["visible"] & ~packed.meta["visible"]).any()


def test_reference_gradients_match_gsplat():
    scene = _scene()
    g = torch.Generator(device="cuda").manual_seed(1)
    w_rgb = torch.rand(C, H, W, 3, device="cuda", generator=g)
    w_alpha = torch.rand(C, H, W, 1, device="cuda", generator=g)
    grads = []
    for backend in ("reference", "gsplat"):
        inputs = [t.clone().requires_grad_(i < 5) for i, t in enumerate(scene)]
        out = rasterize(*inputs, W, H, backend=backend)
        # Accumulated depth (depth * alpha) keeps the loss smooth where alpha is tiny.
        loss = (out.rgb * w_rgb).sum() + ((out.alpha + 0.1 * out.depth * out.alpha) * w_alpha).sum()
        loss.backward()
        grads.append([t.grad.flatten() for t in inputs[:5]])
    for name, g_ref, g_fast in zip(["means", "quats", "scales", "opacities", "colors"], *grads):
        cos = torch.nn.functional.cosine_similarity(g_ref, g_fast, dim=0)
        ratio = g_ref.norm() / g_fast.norm()
        assert cos > 0.999 and abs(ratio - 1) < 0.01, (name, float(cos), float(ratio))
