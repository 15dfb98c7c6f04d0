"""Foreground and background dome in one rasteriser call (``model/render/layers.py``) against the
two-draw reference, on the CPU reference renderer: 24x16 pixels, a few dozen Gaussians.

Camera: OpenCV at the segment origin looking down +z (identity camera-to-segment pose)."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model.node import GaussianParams
from evolsplat_ns.model.render import rasterize, rasterize_features
from evolsplat_ns.model.render import layers
from evolsplat_ns.model.render.layers import rasterize_layered

W, H = 24, 16
K = torch.tensor([[20.0, 0.0, W / 2], [0.0, 20.0, H / 2], [0.0, 0.0, 1.0]])
C2W = torch.eye(4)
OUTPUTS = ("rgb", "depth", "alpha", "background")


def _gaussians(n: int, z: tuple[float, float], spread: float, scale: float, opacity: tuple[float, float],
               seed: int, sh_degree: int = 1) -> GaussianParams:
    """``n`` random Gaussians with camera z in ``z``, x/y within +-spread/2 (segment frame = camera)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([-spread / 2, -spread / 3, z[0]])
    means = torch.rand(n, 3, generator=g) * torch.tensor([spread, 2 * spread / 3, z[1] - z[0]]) + lo
    return GaussianParams(
        means=means, quats=torch.randn(n, 4, generator=g),
        scales=torch.rand(n, 3, generator=g) * scale + 0.3 * scale,
        opacities=torch.rand(n, generator=g) * (opacity[1] - opacity[0]) + opacity[0],
        sh=torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3,
    )


def _scene() -> tuple[GaussianParams, GaussianParams]:
    """Semi-transparent foreground 2-8 m ahead; a 'dome' whose Gaussians are 1-30 m ahead, some in
    front of the foreground (camera z): the one draw must still composite them behind it."""
    return (_gaussians(40, (2.0, 8.0), 6.0, 0.4, (0.2, 0.7), seed=0),
            _gaussians(30, (1.0, 30.0), 40.0, 3.0, (0.5, 0.9), seed=1))


def _render(front, back, single: bool, **kw) -> layers.LayeredImage:
    return rasterize_layered(front, back, C2W, K, W, H, sh_degree=1, single_draw=single, backend="reference", **kw)


def _assert_same(a: layers.LayeredImage, b: layers.LayeredImage, atol: float = 1e-5) -> None:
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("normalize", [True, False])
def test_one_draw_equals_two_draws(normalize):
    front, back = _scene()
    one, two = _render(front, back, True, normalize=normalize), _render(front, back, False, normalize=normalize)
    assert float((1 - two.alpha).min()) > 0.1  # semi-transparent everywhere: no early stop involved
    assert float(two.background.min()) < float(two.background.max())  # the dome shows structure
    _assert_same(one, two)
    assert one.meta is None and two.meta is not None


def test_dome_in_front_of_the_foreground_still_composites_behind():
    """Without moving the dome along its rays, the depth sort would put its near Gaussians first."""
    front, back = _scene()
    z_front, z_back = front.means[:, 2], back.means[:, 2]
    assert bool((z_back < z_front.max()).any())  # the case exists in the scene
    unmoved = layers._behind
    try:
        layers._behind = lambda scales, origin, dirs, z, shift: (origin + dirs, scales)
        naive = _render(front, back, True)
    finally:
        layers._behind = unmoved
    two = _render(front, back, False)
    assert float((naive.rgb - two.rgb).abs().max()) > 1e-2  # the naive sort is visibly wrong
    _assert_same(_render(front, back, True), two)


def test_gradients_match_for_both_sets():
    def grads(single: bool) -> dict[str, torch.Tensor]:
        front, back = _scene()
        leaves = {}
        for tag, g in (("front", front), ("back", back)):
            for field in ("means", "scales", "opacities", "sh"):
                t = getattr(g, field).clone().requires_grad_(True)
                setattr(g, field, t)
                leaves[f"{tag}.{field}"] = t
        out = _render(front, back, single)
        w = torch.linspace(0.5, 1.5, W)[None, :, None]  # position-dependent: gradients not all equal
        loss = (out.rgb * w).sum() + 0.1 * (out.depth * w).sum() + (out.alpha * w).sum()
        loss.backward()
        return {k: v.grad for k, v in leaves.items()}

    one, two = grads(True), grads(False)
    for name in two:
        assert float(two[name].abs().max()) > 0, name
        torch.testing.assert_close(one[name], two[name], atol=1e-4, rtol=1e-4, msg=name)


def _opaque_wall_scene() -> tuple[GaussianParams, GaussianParams]:
    """:func:`_scene` plus two stacked opacity-1 Gaussians in the foreground (the second stops
    the pixel: T_fg ~ 1e-3 left) and an opacity-1 dome Gaussian behind them."""
    front, back = _scene()
    wall = GaussianParams(means=torch.tensor([[-1.0, 0.0, 4.0], [-1.0, 0.0, 4.5]]),
                          quats=torch.tensor([[1.0, 0, 0, 0]] * 2), scales=torch.full((2, 3), 1.0),
                          opacities=torch.ones(2), sh=torch.zeros(2, 4, 3))
    disc = GaussianParams(means=torch.tensor([[-1.0, 0.0, 20.0]]), quats=torch.tensor([[1.0, 0, 0, 0]]),
                          scales=torch.full((1, 3), 4.0), opacities=torch.ones(1), sh=torch.full((1, 4, 3), 0.5))
    join = lambda a, b: GaussianParams(*(torch.cat([getattr(a, f), getattr(b, f)])  # noqa: E731
                                         for f in ("means", "quats", "scales", "opacities", "sh")))
    return join(front, wall), join(back, disc)


def test_opaque_foreground_differs_only_by_the_early_stop():
    """Where the foreground is (nearly) opaque the rasteriser's early stop leaves dome Gaussians out
    of the one draw: the foreground outputs stay exact, the composite differs from two draws by at
    most T_fg * |background| and is exact where the foreground is see-through; gradients finite."""
    front, back = _opaque_wall_scene()
    front.sh.requires_grad_(True)
    one, two = _render(front, back, True), _render(front, back, False)
    trans = 1.0 - two.alpha
    assert float(trans.min()) < 1e-3  # opaque somewhere
    for name in ("depth", "alpha"):
        torch.testing.assert_close(getattr(one, name), getattr(two, name), atol=1e-5, rtol=0)
    diff = (one.rgb - two.rgb).abs()
    assert float(diff.max()) > 1e-5  # the early stop does show
    assert bool((diff <= trans * two.background.abs() + 1e-5).all())
    clear = (trans > 0.2).expand_as(diff)
    torch.testing.assert_close(one.rgb[clear], two.rgb[clear], atol=1e-5, rtol=0)
    one.rgb.sum().backward()
    assert bool(torch.isfinite(front.sh.grad).all())


def test_sky_warp_blend_matches():
    front, back = _scene()
    g = torch.Generator().manual_seed(2)
    sky = (torch.rand(H, W, 3, generator=g), torch.rand(H, W, generator=g))
    sky[1][:, : W // 3] = 0.0  # the dome alone there
    sky[1][:, -W // 3:] = 1.0  # the warp alone there
    one, two = _render(front, back, True, sky=sky), _render(front, back, False, sky=sky)
    _assert_same(one, two)
    torch.testing.assert_close(one.background[:, -W // 3:], sky[0][:, -W // 3:])


def test_no_background_is_one_plain_draw():
    front, _ = _scene()
    one, two = _render(front, None, True), _render(front, None, False)
    _assert_same(one, two)
    assert one.background is None and one.meta is not None


def test_feature_path_checks_its_own_shapes():
    front, _ = _scene()
    args = (front.means, front.quats, front.scales, front.opacities)
    cam = (torch.eye(4)[None], K[None], W, H)
    feats, alpha, _ = rasterize_features(*args, torch.rand(len(front), 9), *cam, backend="reference")
    assert feats.shape == (1, H, W, 9) and alpha.shape == (1, H, W, 1)
    with pytest.raises(ValueError, match="features"):
        rasterize_features(*args, torch.rand(len(front) + 1, 9), *cam, backend="reference")
    with pytest.raises(ValueError, match="colors"):  # the RGB path still wants 3 channels
        rasterize(*args, torch.rand(len(front), 9), *cam, backend="reference")


@pytest.fixture(scope="module")
def model_factory():
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel, EVolSplatModelConfig

    def make(**cfg) -> EVolSplatModel:
        return EVolSplatModel(EVolSplatModelConfig(renderer="reference", sh_degree=1, **cfg), scene_box=None,
                              num_train_data=1)
    return make


def _count_feature_draws(monkeypatch) -> list[int]:
    calls = []
    real = layers.rasterize_feature_blocks
    monkeypatch.setattr(layers, "rasterize_feature_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_model_draws_once_unless_sky_loss_or_meta(model_factory, monkeypatch):
    front, back = _scene()
    calls = _count_feature_draws(monkeypatch)
    single, double = model_factory(), model_factory(single_draw_background=False)
    out = single.rasterize_gaussians(front, back, C2W, K, W, H)
    ref = double.rasterize_gaussians(front, back, C2W, K, W, H)
    assert len(calls) == 1
    for key in ("rgb", "depth", "accumulation", "background_rgb"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=0, msg=key)
    # Densification reads the foreground's own meta: two draws, meta of the foreground rows only.
    meta = single.rasterize_gaussians(front, back, C2W, K, W, H, with_meta=True)["meta"]
    assert len(calls) == 1 and meta["means2d"].shape == (1, len(front), 2)
    # The sky loss reads the un-attenuated background on every sky pixel: two draws.
    sky_out = model_factory(sky_loss_weight=1.0).rasterize_gaussians(front, back, C2W, K, W, H)
    assert len(calls) == 1
    torch.testing.assert_close(sky_out["background_rgb"], ref["background_rgb"])


def _posed(angle: float, x: float) -> torch.Tensor:
    """OpenCV camera-to-segment: yawed by ``angle`` rad about y, moved ``x`` m along x."""
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    pose = torch.eye(4)
    pose[:3, :3] = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    pose[0, 3] = x
    return pose


def _requiring_grad(g: GaussianParams) -> GaussianParams:
    return GaussianParams(*(getattr(g, f).clone().requires_grad_(True)
                            for f in ("means", "quats", "scales", "opacities", "sh")))


def test_blocks_draw_each_camera_with_its_own_foreground():
    """Three cameras, each with its own foreground and the shared dome, in one call: the images
    and gradients of three one-camera draws (a camera seeing another's rows would differ)."""
    poses = torch.stack([_posed(0.0, 0.0), _posed(0.15, 0.5), _posed(-0.1, -0.4)])
    Ks = K.expand(3, 3, 3)
    sky = (torch.rand(3, H, W, 3, generator=torch.Generator().manual_seed(5)),
           torch.linspace(0, 1, W).expand(3, H, W))
    fronts = [_gaussians(25 + 5 * i, (2.0, 8.0), 6.0, 0.4, (0.2, 0.7), seed=10 + i) for i in range(3)]
    back = _scene()[1]

    def grads(image, parts):
        (image.rgb.square().sum() + 0.01 * image.depth.sum() + image.alpha.sum()).backward()
        return [getattr(p, f).grad for p in parts for f in ("means", "scales", "opacities", "sh")]

    a_fronts, a_back = [_requiring_grad(f) for f in fronts], _requiring_grad(back)
    blocks = layers.rasterize_layered_blocks(a_fronts, a_back, poses, Ks, W, H, sh_degree=1, sky=sky,
                                             backend="reference")
    got = grads(blocks, a_fronts + [a_back])
    b_fronts, b_back = [_requiring_grad(f) for f in fronts], _requiring_grad(back)
    singles = [rasterize_layered(f, b_back, poses[c], K, W, H, sh_degree=1, sky=(sky[0][c], sky[1][c]),
                                 backend="reference") for c, f in enumerate(b_fronts)]
    stacked = layers.LayeredImage(*(torch.stack([getattr(s, n) for s in singles]) for n in OUTPUTS), None)
    want = grads(stacked, b_fronts + [b_back])
    assert blocks.rgb.shape == (3, H, W, 3)
    _assert_same(blocks, stacked)
    assert not torch.allclose(blocks.rgb[0], blocks.rgb[1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("single", [True, False])
def test_a_foreground_in_parts_draws_as_the_joined_set(single: bool):
    """The static scene and the posed actors are passed as parts (joined inside the draw): the
    same images and gradients as their concatenation; an empty part is left out."""
    from evolsplat_ns.model.node import concat_gaussians

    front, back = _scene()
    actors = _gaussians(12, (3.0, 6.0), 2.0, 0.3, (0.4, 0.8), seed=5)
    empty = _gaussians(0, (3.0, 6.0), 2.0, 0.3, (0.4, 0.8), seed=6)
    for g in (front, actors):
        g.means.requires_grad_(True)
    joined = _render(concat_gaussians([front, actors]), back, single)
    grads = torch.autograd.grad(joined.rgb.sum() + joined.depth.sum(), [front.means, actors.means])
    parts = _render([front, empty, actors], back, single)
    _assert_same(parts, joined)
    for a, b in zip(torch.autograd.grad(parts.rgb.sum() + parts.depth.sum(), [front.means, actors.means]), grads):
        torch.testing.assert_close(a, b)
