"""Stage 2's overhead paths keep its behaviour (one host read per run, cached plans and flow views,
gated non-finite terms) and the temporal metric prefers true poses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from evolsplat_ns.data.observations import FlowCache
from evolsplat_ns.engine.evaluation import NextFrame, dynamic_metrics
from evolsplat_ns.model.metrics import warp_error
from test_stage2 import small_config, stage2_trainer, toy_actors


# -- the temporal metric ---------------------------------------------------------------------------

def _blur(img: torch.Tensor) -> torch.Tensor:
    x = img.permute(2, 0, 1)[None]
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)[0].permute(1, 2, 0)


def _shifted(img: torch.Tensor, mask: torch.Tensor, dx: int) -> torch.Tensor:
    """The image with the masked object's pixels moved ``dx`` px right (a box off by dx in the image)."""
    out = img.clone()
    moved, mask_moved = torch.roll(img, dx, dims=1), torch.roll(mask, dx, dims=1)
    out[mask_moved] = moved[mask_moved]
    return out


def _dynamic_view(root):
    """(frame t, camera, images t / t+1, flow t -> t+1, dynamic mask t) with the most dynamic pixels."""
    best = None
    for flow_path in sorted((root / "flow").glob("*.npy")):
        t, cam = (int(x) for x in flow_path.stem.split("_"))
        mask_path = next((root / "dynamic_masks" / "all").glob(f"{t:03d}_{cam}.*"), None)
        if mask_path is None or not next((root / "images").glob(f"{t + 1:03d}_{cam}.*"), None):
            continue
        mask = np.asarray(Image.open(mask_path)) > 0
        mask = mask[..., 0] if mask.ndim == 3 else mask
        if best is None or mask.sum() > best[0]:
            best = (mask.sum(), t, cam, mask)
    _, t, cam, mask = best
    img = lambda f: torch.from_numpy(np.asarray(Image.open(next((root / "images").glob(f"{f:03d}_{cam}.*")))  # noqa: E731
                                                .convert("RGB")).copy()).float() / 255
    flow = torch.from_numpy(np.load(root / "flow" / f"{t:03d}_{cam}.npy")).float()
    return img(t), img(t + 1), flow, torch.from_numpy(mask)


def test_temporal_error_prefers_true_poses_and_does_not_reward_blur(tiny_dataset):
    gt_t, gt_t1, flow, mask = _dynamic_view(tiny_dataset / "000")
    H, W = mask.shape
    target = SimpleNamespace(dynamic_masks=mask[None], images=gt_t[None], width=W, intrinsics=torch.eye(3)[None],
                             height=H)
    sample = SimpleNamespace(target=target)
    following = NextFrame(torch.eye(4), gt_t1, flow, 1.0)

    def error(render_t, render_t1):
        return dynamic_metrics(sample, 0, render_t, following, lambda *a: {"rgb": render_t1})["temporal_warp_error"]

    # a renderer's softness on both frames; the actor placed by the true boxes or by boxes off by a
    # pixel in opposite directions at t and t+1 (box noise), or the whole pair smeared in time
    true = error(_blur(gt_t), _blur(gt_t1))
    noisy = error(_blur(_shifted(gt_t, mask, 1)), _blur(_shifted(gt_t1, torch.roll(mask, 0, 1), -1)))
    smeared = 0.5 * (gt_t + gt_t1)
    static = error(smeared, smeared)
    assert 0 <= true < noisy, (true, noisy)
    assert true < static, "a render static in time is not rewarded"
    assert error(gt_t, gt_t1) == 0.0
    # the former signed definition E(render) - E(gt) called the static pair better than the footage itself
    region = mask
    assert warp_error(smeared, smeared, flow, region) - warp_error(gt_t, gt_t1, flow, region) < 0


def test_warp_error_reference_is_the_residual_difference():
    torch.manual_seed(0)
    a, b, flow = torch.rand(6, 8, 3), torch.rand(6, 8, 3), torch.zeros(6, 8, 2)
    mask = torch.ones(6, 8, dtype=torch.bool)
    assert warp_error(a, b, flow, mask) == pytest.approx(float((a - b).abs().mean()))
    assert warp_error(a, b, flow, mask, reference=(a, b)) == 0.0
    assert warp_error(a + 0.1, b, flow, mask, reference=(a, b)) == pytest.approx(0.1, abs=1e-6)


# -- refine plans, flow cache ----------------------------------------------------------------------

def test_refine_plan_is_cached_per_actor_set_and_budget():
    from evolsplat_ns.model.stage2.refiner import Stage2Refiner

    gauss, nodes = toy_actors(n=50)
    refiner = Stage2Refiner(small_config(max_points_per_object=8))
    first = refiner.plan(nodes)
    assert refiner.plan(nodes) is first, "same actors, same budget: the cached plan"
    assert first.rows == [0, 1] and first.points_host.tolist() == [8, 8]
    refiner.point_budget = 4
    assert refiner.plan(nodes).points_host.tolist() == [4, 4], "a new budget, a new plan"
    out = refiner(gauss, nodes)
    assert out.points.tolist() == [4, 4]


def test_flow_cache_is_bounded_in_bytes_and_loads_once():
    cache = FlowCache(max_bytes=100)
    loads = []

    def loader(key, size):
        def load():
            loads.append(key)
            return key, size
        return load

    assert cache.get("a", loader("a", 60)) == "a" and cache.get("a", loader("a", 60)) == "a"
    assert loads == ["a"] and cache.hits == 1
    cache.get("b", loader("b", 60))  # over the bound: the least recently used goes
    assert len(cache) == 1 and cache.nbytes == 60
    cache.get("big", loader("big", 500))  # larger than the bound: returned, not kept
    assert "big" not in cache._items and len(cache) == 1


# -- inside training -------------------------------------------------------------------------------

def _count_reads(monkeypatch):
    """Count Python-level host reads of tensors (item, tolist, bool, float, int)."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


def test_a_stage2_run_reads_the_device_once():
    from evolsplat_ns.model.stage2.loss import Stage2CompleteLoss
    from evolsplat_ns.model.stage2.refiner import Stage2Refiner
    from evolsplat_ns.model.stage2.step import FlowView, Stage2Step

    gauss, nodes = toy_actors(F=3)
    config = small_config()
    refiner, loss = Stage2Refiner(config), Stage2CompleteLoss(config)
    refiner.plan(nodes)  # built once per segment visit (it reads the actor rows back once)
    H, W = 6, 8
    rgb = torch.rand(H, W, 3, requires_grad=True)
    outputs = {"rgb": rgb, "depth": torch.rand(H, W, 1) + 1, "accumulation": torch.rand(H, W, 1)}
    flow = FlowView(torch.zeros(H, W, 2), 0, torch.eye(3), torch.eye(4), torch.eye(4))
    with pytest.MonkeyPatch.context() as mp:
        counts = _count_reads(mp)
        step2 = Stage2Step(refiner, loss, gauss, nodes, split_backward=True)
        for _ in range(2):
            terms = step2.target_terms(outputs, torch.rand(H, W, 3), torch.rand(H, W) + 1, 0, 2, flow)
            sum(terms.values()).backward()
        step2.finish(lambda total: total.backward())
        report = step2.report()
    # Stage2Step.finish's one read, and per target the check of the host depth map for pixels with
    # ground truth (a host tensor here; a device map is not checked, so on CUDA only the one read)
    assert counts["n"] == 1 + 2, f"{counts['n']} host reads in one run"
    assert report.outcome == "ran" and {"s2_rgb", "s2_depth", "s2_consistency", "s2_reg_pose"} <= set(report.terms)
    assert report.objects == 2 and math.isfinite(report.loss)


def test_flow_views_are_read_from_disk_once_per_segment_frame_and_camera(tiny_dataset, tmp_path, monkeypatch):
    from evolsplat_ns.data.scene import SceneData

    trainer = stage2_trainer(tiny_dataset, tmp_path, stage2_frequency=1)
    model = trainer.pipeline.model
    trainer.train_step(0)
    assert model._flow_views.misses > 0 and model.stage2_loss.consistency_status == "on (dataset flow)"
    sources = model.context.sources
    views = [model._flow_view(sources, v) for v in range(len(sources))]
    assert any(view is not None for view in views)
    monkeypatch.setattr(SceneData, "load_flow", lambda *a, **k: pytest.fail("flow read from disk again"))
    again = [model._flow_view(sources, v) for v in range(len(sources))]
    assert all(a is b for a, b in zip(views, again)), "the same views, from the cache"


def test_nonfinite_stage2_terms_keep_stage1_gradients_finite(tiny_dataset, tmp_path, monkeypatch):
    trainer = stage2_trainer(tiny_dataset, tmp_path, stage2_frequency=1)
    model = trainer.pipeline.model
    real_terms = model.stage2_loss.render_terms
    monkeypatch.setattr(model.stage2_loss, "render_terms",
                        lambda inputs: {k: v * float("nan") for k, v in real_terms(inputs).items()})
    seen = {}
    step_all = trainer.optimizers.optimizer_scaler_step_all

    def spy(scaler):
        grads = [p.grad for p in model.predictor.parameters() if p.grad is not None]
        seen["finite"] = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
        seen["stage2"] = [p.grad for p in model.stage2.parameters() if p.grad is not None]
        return step_all(scaler)

    trainer.optimizers.optimizer_scaler_step_all = spy
    _, losses, _ = trainer.train_step(0)
    assert seen["finite"], "stage 1 steps with finite gradients"
    assert seen["stage2"] == [], "the refiner's gradients are dropped"
    assert not any(k.startswith("s2_") for k in losses) and all(math.isfinite(float(v)) for v in losses.values())
    s = trainer.pipeline.stage2_controller.get_statistics()
    assert s["skipped_nonfinite"] == 1 and s["runs"] == 0
