"""The background warped from the sources at infinity (``model/sky_warp.py``) and its use in the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evolsplat_ns.model.sky_warp import BORDER_FEATHER, DIRECTION_TAU, warp_at_infinity


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _pose(R: np.ndarray, t=(0.0, 0.0, 0.0)) -> torch.Tensor:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return torch.tensor(T, dtype=torch.float32)


def _K(f: float, w: int, h: int) -> torch.Tensor:
    return torch.tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])


def _bilinear(img: np.ndarray, u: float, v: float) -> np.ndarray:
    """Bilinear tap of ``img`` [H, W, C] at continuous pixel (u, v) (centres at +0.5), zeros outside."""
    h, w = img.shape[:2]
    x, y = u - 0.5, v - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(img.shape[2])
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += wgt * img[yi, xi]
    return out


def _reference(images, Ks, c2ws, c2w_t, K_t, width, height, sky=None, tau=DIRECTION_TAU):
    """Pixel by pixel, source by source, in float64 numpy: what ``warp_at_infinity`` computes."""
    images, Ks, c2ws = images.double().numpy(), Ks.double().numpy(), c2ws.double().numpy()
    sky = np.ones(images.shape[:3]) if sky is None else sky.double().numpy()
    K_inv, R_t = np.linalg.inv(K_t.double().numpy()), c2w_t.double().numpy()[:3, :3]
    rgb, weight = np.zeros((height, width, 3)), np.zeros((height, width))
    hs, ws = images.shape[1:3]
    feather = max(1.0, BORDER_FEATHER * min(hs, ws))
    for j in range(height):
        for i in range(width):
            d = R_t @ K_inv @ np.array([i + 0.5, j + 0.5, 1.0])
            d /= np.linalg.norm(d)
            covers, colours, cosines = [], [], []
            for s in range(len(images)):
                cam = c2ws[s, :3, :3].T @ d
                if cam[2] <= 1e-6:
                    continue
                u, v = (Ks[s] @ cam)[:2] / cam[2]
                tap = _bilinear(np.concatenate([images[s] * sky[s][..., None], sky[s][..., None]], -1), u, v)
                edge = min(u, ws - u, v, hs - v)
                cover = tap[3] * min(max(edge / feather, 0.0), 1.0)
                if cover > 0:
                    covers.append(cover)
                    colours.append(tap[:3] / max(tap[3], 1e-6))
                    cosines.append(cam[2])
            if covers:
                w = np.array(covers) * np.exp((np.array(cosines) - max(cosines)) / tau)
                rgb[j, i] = (w[:, None] * np.array(colours)).sum(0) / w.sum()
                weight[j, i] = max(covers)
    return torch.tensor(rgb, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32)


def test_matches_the_reference_with_masks_and_several_sources():
    g = torch.Generator().manual_seed(0)
    hs, ws, W, H = 10, 14, 12, 9
    images = torch.rand(3, hs, ws, 3, generator=g)
    sky = torch.rand(3, hs, ws, generator=g) > 0.3
    Ks = torch.stack([_K(12.0, ws, hs), _K(10.0, ws, hs), _K(14.0, ws, hs)])
    c2ws = torch.stack([_pose(_rot("y", 0)), _pose(_rot("y", 25), (3, 0, 1)), _pose(_rot("x", 10) @ _rot("y", -20))])
    c2w_t, K_t = _pose(_rot("y", 8) @ _rot("x", -5), (10, 2, -4)), _K(11.0, W, H)
    for mask in (None, sky):
        rgb, weight = warp_at_infinity(images, Ks, c2ws, c2w_t, K_t, W, H, mask)
        ref_rgb, ref_weight = _reference(images, Ks, c2ws, c2w_t, K_t, W, H, mask)
        assert rgb.shape == (H, W, 3) and weight.shape == (H, W)
        torch.testing.assert_close(weight, ref_weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb, ref_rgb, atol=1e-5, rtol=0)
        assert 0 < float(weight.mean()) < 1  # some pixels covered, some not: both paths checked


def test_a_rotated_target_sees_the_source_pixels_at_infinity():
    """A target rolled 90 degrees about the optical axis (square image, centred principal point),
    far from the source: its pixels are exactly the source's, rotated; a target yawed sees each
    pixel where a very distant point along its ray projects into the source."""
    n = 8
    image = torch.rand(1, n, n, 3, generator=torch.Generator().manual_seed(1))
    K = _K(6.0, n, n)[None]
    rgb, weight = warp_at_infinity(image, K, _pose(np.eye(3))[None], _pose(_rot("z", 90), (50, -20, 7)), K[0], n, n)
    # Target x axis = source y axis: target pixel (row j, col i) is source (row i, col n-1-j).
    torch.testing.assert_close(rgb, torch.rot90(image[0], k=1, dims=(0, 1)), atol=1e-5, rtol=0)
    assert bool((weight[1:-1, 1:-1] == 1).all())  # inside the border ramp, fully covered

    from evolsplat_ns.geometry import invert_rigid, project_points

    c2w_t = _pose(_rot("y", 12), (1.0, 0.0, 2.0))
    rgb, weight = warp_at_infinity(image, K, _pose(np.eye(3))[None], c2w_t, K[0], n, n)
    i, j = 2, 5  # a target pixel; its ray 1e6 m out, projected with the generic camera code
    ray = c2w_t[:3, :3] @ torch.linalg.inv(K[0]) @ torch.tensor([i + 0.5, j + 0.5, 1.0])
    uv, _ = project_points((c2w_t[:3, 3] + 1e6 * ray)[None], K, invert_rigid(_pose(np.eye(3)))[None])
    expected = _bilinear(image[0].double().numpy(), float(uv[0, 0, 0]), float(uv[0, 0, 1]))
    torch.testing.assert_close(rgb[j, i], torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=0)


def test_sky_masks_and_uncovered_pixels():
    n = 8
    image = torch.zeros(1, n, n, 3)
    image[:, : n // 2] = torch.tensor([0.2, 0.4, 0.9])  # sky above
    image[:, n // 2:] = torch.tensor([0.5, 0.3, 0.1])  # a facade below
    sky = torch.zeros(1, n, n, dtype=torch.bool)
    sky[:, : n // 2] = True
    K = _K(6.0, n, n)[None]
    eye = _pose(np.eye(3))[None]
    # Principal point half a pixel up: target row j samples source row j + 0.5, between two rows.
    K_t = K[0].clone()
    K_t[1, 2] -= 0.5
    rgb, weight = warp_at_infinity(image, K, eye, eye[0], K_t, n, n, sky)
    assert bool((weight[n // 2:] == 0).all()) and bool((rgb[n // 2:] == 0).all())  # facade: not warped
    # The last sky row taps sky and facade half and half: coverage 1/2, colour still pure sky
    # (mask-weighted taps: the facade does not bleed in).
    torch.testing.assert_close(weight[n // 2 - 1, 1:-1], torch.full((n - 2,), 0.5))
    torch.testing.assert_close(weight[: n // 2 - 1, 1:-1], torch.ones(n // 2 - 1, n - 2))
    torch.testing.assert_close(rgb[: n // 2], image[0, :1].expand(n // 2, n, 3), atol=1e-6, rtol=0)
    # A target looking backwards sees nothing of a forward source.
    rgb, weight = warp_at_infinity(image, K, eye, _pose(_rot("y", 180)), K[0], n, n)
    assert bool((weight == 0).all()) and bool((rgb == 0).all())


def test_uncovered_pixels_show_the_dome_in_the_composite():
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel, EVolSplatModelConfig
    from evolsplat_ns.model.node import GaussianParams

    model = EVolSplatModel(EVolSplatModelConfig(renderer="reference", sh_degree=0), scene_box=None, num_train_data=1)
    n = 8
    K, c2w = _K(6.0, n, n), torch.eye(4)

    def one_gaussian(z: float, dc: float) -> GaussianParams:
        return GaussianParams(means=torch.tensor([[0.0, 0.0, z]]), quats=torch.tensor([[1.0, 0, 0, 0]]),
                              scales=torch.full((1, 3), 1e3 * z), opacities=torch.ones(1), sh=torch.full((1, 1, 3), dc))

    fg = one_gaussian(5.0, 0.0)
    fg.opacities = torch.zeros(1)  # see-through foreground: the composite is the background
    dome = one_gaussian(50.0, 1.0)  # a bright, screen-filling dome
    warp = torch.full((n, n, 3), 0.25)
    weight = torch.zeros(n, n)
    weight[:, : n // 2] = 1.0
    out = model.rasterize_gaussians(fg, dome, c2w, K, n, n, sky=(warp, weight))
    plain = model.rasterize_gaussians(fg, dome, c2w, K, n, n)
    torch.testing.assert_close(out["rgb"][:, : n // 2], warp[:, : n // 2])
    torch.testing.assert_close(out["rgb"][:, n // 2:], plain["rgb"][:, n // 2:])
    assert float(plain["rgb"][:, n // 2:].min()) > 0.5  # the dome's colour, not black


@pytest.fixture(scope="module")
def sources_trainer(tiny_dataset, tmp_path_factory):
    from tiny_run import lite_trainer

    def configure(cfg) -> None:
        cfg.pipeline.model.background_source = "sources"
        cfg.pipeline.model.sky_loss_weight = 1.0
        cfg.pipeline.model.sky_opacity_weight = 0.1
        cfg.pipeline.datamanager.dataset.load_sky_masks = True

    return lite_trainer(tiny_dataset, tmp_path_factory.mktemp("sky_warp_runs"), configure=configure)


def test_model_renders_the_sources_sky_and_heads_still_learn(sources_trainer):
    pipeline, model = sources_trainer.pipeline, sources_trainer.pipeline.model
    sample, batch = pipeline.datamanager.next_train(1)
    sources_trainer.optimizers.zero_grad_all()
    losses, _ = pipeline.sample_loss(sample, batch, step=1)
    assert {"rgb_loss", "sky_loss", "sky_opacity_loss"} <= set(losses)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for head in ("predictor.color_head", "predictor.opacity_head", "predictor.background"):
        assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if n.startswith(head)), head
    sources_trainer.optimizers.zero_grad_all()

    # The composite's background is the warped sources where they cover the target.
    state = model.encode(split_backward=False)
    assert state.sources is not None and state.sources.images is model.context.sources.images  # a reference
    t = sample.target
    c2w, K = t.camtoworlds[0], t.intrinsics[0]
    views = model.predictor.nearest_views(state, c2w)
    rgb, weight = model.predictor.predict_sky(state, views, c2w, K, t.width, t.height)
    assert not rgb.requires_grad and float(weight.max()) == 1.0 and float(weight.min()) == 0.0
    with torch.no_grad():
        out = model.render(state, c2w, K, t.width, t.height)
    covered = weight == 1
    torch.testing.assert_close(out["background_rgb"][covered], rgb[covered])


def test_finetune_renders_leave_the_views_own_image_out():
    """Fine-tuning with ``background_source "sources"`` warps the nearest training views other than
    the rendered one: at a training view's pose the background is another view's sky."""
    from evolsplat_ns.data.types import SegmentKey, Views
    from evolsplat_ns.inference.finetune import FinetuneGaussians
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel, EVolSplatModelConfig
    from evolsplat_ns.model.node import GaussianParams

    model = EVolSplatModel(EVolSplatModelConfig(renderer="reference", sh_degree=0, background_source="sources"),
                           scene_box=None, num_train_data=1)
    n = 6
    g = GaussianParams(means=torch.tensor([[0.0, 0.0, 5.0]]), quats=torch.tensor([[1.0, 0, 0, 0]]),
                       scales=torch.full((1, 3), 0.1), opacities=torch.ones(1), sh=torch.zeros(1, 1, 3))
    gaussians = FinetuneGaussians(SegmentKey.parse("000/seg000"),
                                  g, g, None, None)
    poses = torch.stack([torch.eye(4), _pose(np.eye(3), (1.0, 0.0, 0.0))])
    images = torch.stack([torch.full((n, n, 3), 0.2), torch.full((n, n, 3), 0.7)])
    K = _K(5.0, n, n)
    views = Views(images=images, intrinsics=K.expand(2, 3, 3), camtoworlds=poses, frame_ids=torch.arange(2),
                  cam_ids=torch.zeros(2, dtype=torch.long))
    assert gaussians.source_sky(model, poses[0], K, n, n) is None  # not asked for: the dome alone
    gaussians.use_source_sky(views)
    rgb, weight = gaussians.source_sky(model, poses[0], K, n, n)
    torch.testing.assert_close(rgb[weight > 0], torch.full((int((weight > 0).sum()), 3), 0.7))
    rgb, _ = gaussians.source_sky(model, poses[1], K, n, n)
    assert float(rgb.max()) == pytest.approx(0.2)
