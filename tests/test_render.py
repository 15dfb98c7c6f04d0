"""CPU tests of the Gaussian renderer (pure-PyTorch reference backend, gsplat semantics).

Cameras here are OpenCV (x right, y down, z forward) with identity world-to-camera unless stated,
so a Gaussian at world (0, 0, z) sits straight ahead at depth z.
"""

from __future__ import annotations

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

from evolsplat_ns.model.render import RenderOutput, rasterize, resolve_backend, rgb_to_sh0
from evolsplat_ns.model.render.reference import rasterize_reference

W, H = 33, 25  # odd sizes: partial 16x16 tiles at the right and bottom edges
F = 100.0
CX, CY = 16.5, 12.5  # principal point on the centre of pixel (16, 12)


def _camera(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """viewmats [n, 4, 4] (identity world-to-camera, OpenCV axes) and Ks [n, 3, 3]."""
    K = torch.tensor([[F, 0.0, CX], [0.0, F, CY], [0.0, 0.0, 1.0]])
    return torch.eye(4).expand(n, 4, 4).clone(), K.expand(n, 3, 3).clone()


def _gaussians(centres, scale, opacity, colors):
    """Isotropic Gaussians: means [N, 3], identity quats, scales [N, 3], opacities [N], colors."""
    means = torch.tensor(centres, dtype=torch.float32)
    n = means.shape[0]
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(n, 4).clone()
    scales = torch.full((n, 3), scale)
    return means, quats, scales, torch.full((n,), opacity), torch.tensor(colors)


def _random_scene(n: int, seed: int, cameras: int = 2):
    """n random anisotropic Gaussians 3-8 m in front of ``cameras`` slightly different cameras."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) * torch.tensor([3.0, 2.0, 5.0]) + torch.tensor(
        [-1.5, -1.0, 3.0]
    )
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.25 + 0.03
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    viewmats, Ks = _camera(cameras)
    viewmats[:, 0, 3] = torch.linspace(0.0, 0.3, cameras)  # shift cameras sideways
    return means, quats, scales, opacities, colors, viewmats, Ks


def test_single_gaussian_matches_hand_computation():
    colour = [0.2, 0.6, 0.9]
    z, s, o = 5.0, 0.1, 0.8
    out = rasterize(*_gaussians([[0.0, 0.0, z]], s, o, [colour]), *_camera(), W, H)
    assert isinstance(out, RenderOutput) and out.meta["backend"] == "reference"
    assert out.rgb.shape == (1, H, W, 3) and out.depth.shape == out.alpha.shape == (1, H, W, 1)

    var2d = (F * s / z) ** 2 + 0.3  # projected variance in px^2 plus gsplat's eps2d dilation
    alpha = out.alpha[0, ..., 0]
    assert divmod(int(alpha.argmax()), W) == (12, 16)
    torch.testing.assert_close(alpha[12, 16], torch.tensor(o))
    torch.testing.assert_close(out.rgb[0, 12, 16], o * torch.tensor(colour))
    torch.testing.assert_close(out.depth[0, 12, 16, 0], torch.tensor(z))
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1)]:
        expected = o * math.exp(-0.5 * (dx * dx + dy * dy) / var2d)
        torch.testing.assert_close(alpha[12 + dy, 16 + dx], torch.tensor(expected))
    assert alpha[0, 0] == 0 and out.rgb[0, 0, 0].abs().sum() == 0


def test_front_gaussian_dominates_and_swap_swaps():
    red, green = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]

    def centre_pixel(z_red: float, z_green: float) -> RenderOutput:
        g = _gaussians([[0.0, 0.0, z_red], [0.0, 0.0, z_green]], 0.2, 0.9, [red, green])
        return rasterize(*g, *_camera(), W, H)

    near_red = centre_pixel(4.0, 8.0)
    torch.testing.assert_close(near_red.rgb[0, 12, 16], torch.tensor([0.9, 0.1 * 0.9, 0.0]))
    expected_depth = (0.9 * 4.0 + 0.1 * 0.9 * 8.0) / (0.9 + 0.1 * 0.9)
    torch.testing.assert_close(near_red.depth[0, 12, 16, 0], torch.tensor(expected_depth))
    near_green = centre_pixel(8.0, 4.0)
    torch.testing.assert_close(near_green.rgb[0, 12, 16], torch.tensor([0.1 * 0.9, 0.9, 0.0]))
    torch.testing.assert_close(near_green.alpha, near_red.alpha)


def test_background_fills_uncovered_pixels():
    g = _gaussians([[0.0, 0.0, 5.0]], 0.1, 0.8, [[0.2, 0.6, 0.9]])
    bg = torch.tensor([[0.1, 0.2, 0.3]])
    plain = rasterize(*g, *_camera(), W, H)
    with_bg = rasterize(*g, *_camera(), W, H, backgrounds=bg)
    torch.testing.assert_close(with_bg.rgb[0, 0, 0], bg[0])
    torch.testing.assert_close(with_bg.rgb, plain.rgb + (1 - plain.alpha) * bg[:, None, None, :])
    torch.testing.assert_close(with_bg.alpha, plain.alpha)


@pytest.mark.parametrize("degree", [0, 1])
def test_sh_with_only_degree0_equals_rgb(degree: int):
    means, quats, scales, opacities, colors, viewmats, Ks = _random_scene(40, seed=1)
    sh = torch.zeros(40, (degree + 1) ** 2, 3)
    sh[:, 0] = rgb_to_sh0(colors)
    as_rgb = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    as_sh = rasterize(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=degree)
    torch.testing.assert_close(as_sh.rgb, as_rgb.rgb, atol=1e-6, rtol=0)


def test_gradients_reach_every_input():
    inputs = list(_random_scene(60, seed=2))
    # Culled Gaussians must get zero, not NaN, gradients: one behind, one on the z = 0 plane.
    inputs[0][:2] = torch.tensor([[0.5, 0.2, -2.0], [0.1, 0.1, 0.0]])
    for t in inputs[:5]:
        t.requires_grad_(True)
    out = rasterize(*inputs, W, H)
    weights = torch.rand(out.rgb.shape, generator=torch.Generator().manual_seed(0))
    ((out.rgb * weights).sum() + out.depth.mean() + out.alpha.sum()).backward()
    for name, t in zip(["means", "quats", "scales", "opacities", "colors"], inputs):
        assert torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


def _brute_force(means, quats, scales, opacities, colors, viewmats, Ks, width, height):
    """Per-pixel loop over depth-sorted Gaussians, written from gsplat's CUDA kernel: returns
    alpha-weighted RGB + depth sums [C, H, W, 4] and alpha [C, H, W] (no background)."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height
    )
    C, N = radii.shape
    feats = torch.zeros(C, height, width, 4, dtype=torch.float64)
    alphas = torch.zeros(C, height, width, dtype=torch.float64)
    for c in range(C):
        order = sorted(range(N), key=lambda n: float(depths[c, n]))
        for y in range(height):
            for x in range(width):
                T = 1.0
                for n in order:
                    r, (mx, my) = float(radii[c, n]), means2d[c, n].tolist()
                    # A Gaussian reaches every pixel of the 16x16 tiles its radius box touches.
                    if r <= 0 or not (
                        math.floor((mx - r) / 16) <= x // 16 < math.ceil((mx + r) / 16)
                        and math.floor((my - r) / 16) <= y // 16 < math.ceil((my + r) / 16)
                    ):
                        continue
                    a, b, cc = conics[c, n].tolist()
                    dx, dy = mx - (x + 0.5), my - (y + 0.5)
                    sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
                    alpha = min(0.999, float(opacities[n]) * math.exp(-sigma))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    if T * (1 - alpha) <= 1e-4:
                        break
                    rgbd = colors[n].tolist() + [float(depths[c, n])]
                    feats[c, y, x] += torch.tensor(rgbd, dtype=torch.float64) * alpha * T
                    alphas[c, y, x] += alpha * T
                    T *= 1 - alpha
    return feats, alphas


@pytest.mark.parametrize("opaque", [False, True])
def test_tile_compositor_matches_brute_force_loop(opaque: bool):
    scene = _random_scene(14, seed=3)
    if opaque:  # large Gaussians capped at alpha 0.999 stop compositing at T <= 1e-4
        scene[2].mul_(4.0)
        scene[3].fill_(1.0)
    feats, alphas = _brute_force(*scene, W, H)
    out = rasterize(*scene, W, H)
    assert (alphas > 0.9998).any() if opaque else ((alphas > 0.5).any() and (alphas == 0).any())
    torch.testing.assert_close(out.alpha[..., 0].double(), alphas, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rgb.double(), feats[..., :3], atol=1e-5, rtol=0)
    covered = alphas > 0.05
    expected_depth = feats[..., 3][covered] / alphas[covered]
    torch.testing.assert_close(out.depth[..., 0][covered].double(), expected_depth, atol=1e-4,
                               rtol=1e-5)


def test_chunked_compositing_matches_single_chunk_with_gradients():
    scene = list(_random_scene(200, seed=4))
    results = []
    for chunk_elems in (1 << 20, 2048):  # 2048 forces one tile per chunk + recomputation
        inputs = [t.clone().requires_grad_(i < 5) for i, t in enumerate(scene)]
        out, alpha, _ = rasterize_reference(*inputs, W, H, chunk_elems=chunk_elems)
        (out[..., :3].sum() + alpha.sum()).backward()
        results.append([out, alpha] + [t.grad for t in inputs[:5]])
    for single, chunked in zip(*results):
        torch.testing.assert_close(chunked, single)


def test_gsplat_backend_on_cpu_is_a_clear_error(monkeypatch):
    scene = _random_scene(5, seed=5)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        rasterize(*scene, W, H, backend="gsplat")
    with pytest.raises(ValueError, match="Unknown renderer 'cuda'"):
        rasterize(*scene, W, H, backend="cuda")
    monkeypatch.setenv("EVOLSPLAT_RENDERER", "gsplat")
    with pytest.raises(ValueError, match="EVOLSPLAT_RENDERER"):
        rasterize(*scene, W, H)
    assert resolve_backend("reference", is_cuda=False) == "reference"  # explicit name wins
    monkeypatch.setenv("EVOLSPLAT_RENDERER", "reference")
    assert resolve_backend("auto", is_cuda=True) == "reference"


def test_bad_shapes_name_the_argument():
    means, quats, scales, opacities, colors, viewmats, Ks = _random_scene(5, seed=6)
    with pytest.raises(ValueError, match="opacities has shape"):
        rasterize(means, quats, scales, opacities[:, None], colors, viewmats, Ks, W, H)
    with pytest.raises(ValueError, match="colors has shape"):
        rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H, sh_degree=1)
