"""Stage 2: SE(3) maps, refine heads (identity at init), the render hook, the loss, the controller."""

from __future__ import annotations

import math

import pytest
import torch

from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.heads import GAUSSIAN_INPUT_LAYOUT, GAUSSIAN_OUTPUT_LAYOUT, GaussianRefineHead
from evolsplat_ns.model.stage2.refiner import Stage2Refiner
from evolsplat_ns.model.stage2.se3 import quat_exp, se3_exp, se3_log, so3_exp


def small_config(**kw) -> Stage2Config:
    return Stage2Config(enabled=True, gaussian_feature_dim=16, pose_feature_dim=16, gaussian_num_heads=2, **kw)


def toy_actors(K: int = 2, n: int = 20, F: int = 5, seed: int = 0) -> tuple[ActorGaussians, ActorNodes]:
    """K actors of n Gaussians over F frames, each moving 1 m per frame along x; actor 1 misses frame 2."""
    g = torch.Generator().manual_seed(seed)
    N = K * n
    actor = torch.arange(K).repeat_interleave(n)
    means = torch.rand(N, 3, generator=g) - 0.5
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    gauss = ActorGaussians(means, quats, torch.rand(N, 3, generator=g) * 0.1 + 0.01,
                           torch.rand(N, generator=g) * 0.8 + 0.1, torch.randn(N, 4, 3, generator=g), actor)
    poses = torch.eye(4).repeat(K, F, 1, 1)
    poses[:, :, 0, 3] = torch.arange(F, dtype=torch.float32)
    poses[:, :, 1, 3] = torch.arange(K, dtype=torch.float32)[:, None] * 3
    valid = torch.ones(K, F, dtype=torch.bool)
    if K > 1:
        valid[1, 2] = False
    nodes = ActorNodes(means, gauss.sh[:, 0], gauss.scales.log(), actor, torch.arange(F), poses, valid,
                       torch.tensor([[4.0, 2.0, 1.5]]).repeat(K, 1), tuple(str(k) for k in range(K)))
    return gauss, nodes


def _clip_angle(xi: torch.Tensor, max_angle: float = 3.0) -> torch.Tensor:
    w = xi[:, :3]
    n = w.norm(dim=-1, keepdim=True)
    return torch.cat([w / n * n.clamp(max=max_angle), xi[:, 3:]], -1)


# -- 1. SE(3) ----------------------------------------------------------------------------------------


def test_se3_exp_log_round_trip():
    xi = _clip_angle(torch.randn(500, 6, dtype=torch.float64))
    assert (se3_log(se3_exp(xi)) - xi).abs().max() < 1e-6
    tiny = torch.randn(50, 6, dtype=torch.float64) * 1e-7
    assert (se3_log(se3_exp(tiny)) - tiny).abs().max() < 1e-12
    T = se3_exp(xi)
    R = T[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-12)
    assert torch.equal(se3_exp(torch.zeros(6)), torch.eye(4))


def test_quat_exp_matches_rodrigues():
    from evolsplat_ns.geometry import quat_to_matrix

    w = torch.randn(20, 3, dtype=torch.float64)
    assert torch.allclose(quat_to_matrix(quat_exp(w)), so3_exp(w), atol=1e-12)
    assert torch.equal(quat_exp(torch.zeros(3)), torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("at_zero", [True, False])
def test_gradients_reach_all_six_pose_dims(at_zero):
    xi = (torch.zeros(6) if at_zero else torch.randn(6) * 0.3).double().requires_grad_(True)
    points = torch.randn(10, 3, dtype=torch.float64)
    T = se3_exp(xi)
    moved = points @ T[:3, :3].T + T[:3, 3]
    (moved * torch.randn_like(moved)).sum().backward()
    assert torch.all(xi.grad.abs() > 0) and torch.all(torch.isfinite(xi.grad))
    assert torch.autograd.gradcheck(se3_exp, (xi.detach().clone().requires_grad_(True),))


# -- 1. heads ----------------------------------------------------------------------------------------


def test_refiner_is_exact_identity_at_init():
    gauss, nodes = toy_actors()
    out = Stage2Refiner(small_config())(gauss, nodes)
    for name in ("means", "quats", "scales", "opacities", "sh"):
        assert torch.equal(getattr(out.gaussians, name), getattr(gauss, name)), name
    assert torch.equal(out.poses, nodes.poses)
    assert torch.allclose(out.gaussians.quats.norm(dim=-1), torch.ones(len(gauss.actor)), atol=1e-6)
    assert bool(out.refined.all())


def test_layouts_are_named_and_do_not_overlap():
    for layout, dim in ((GAUSSIAN_INPUT_LAYOUT, 14), (GAUSSIAN_OUTPUT_LAYOUT, 13)):
        covered = sorted(i for s in layout.values() for i in range(s.start, s.stop))
        assert covered == list(range(dim))


def test_gaussian_head_is_permutation_equivariant():
    torch.manual_seed(0)
    head = GaussianRefineHead(feature_dim=16, num_heads=2)
    torch.nn.init.normal_(head.out.weight)  # non-zero output, else equivariance is trivial
    g = torch.randn(30, 14)
    perm = torch.randperm(30)
    assert torch.allclose(head(g)[0][perm], head(g[perm])[0], atol=1e-5)


def test_refined_quaternions_stay_unit_after_training_moves_the_heads():
    gauss, nodes = toy_actors()
    refiner = Stage2Refiner(small_config())
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.5)
    out = refiner(gauss, nodes)
    assert torch.allclose(out.gaussians.quats.norm(dim=-1), torch.ones(len(gauss.actor)), atol=1e-5)
    assert not torch.equal(out.poses, nodes.poses)
    R = out.poses[..., :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand_as(R), atol=1e-5)
    assert out.xi[..., :3].abs().max() <= 0.1 + 1e-6 and out.xi[..., 3:].abs().max() <= 0.5 + 1e-6
    assert torch.equal(out.xi[1, 2], torch.zeros(6))  # no box at that frame: no correction


def test_point_budget_caps_what_the_heads_see():
    gauss, nodes = toy_actors(n=50)
    refiner = Stage2Refiner(small_config(max_points_per_object=8))
    out = refiner(gauss, nodes)
    assert out.points.tolist() == [8, 8]


# -- 3. loss terms -----------------------------------------------------------------------------------

from evolsplat_ns.model.stage2 import loss as s2loss  # noqa: E402


def test_temporal_smoothness_is_zero_for_constant_velocity_and_positive_for_jitter():
    _, nodes = toy_actors(K=1, F=6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert float(s2loss.temporal_smoothness(nodes.poses, mask)) == pytest.approx(0.0, abs=1e-10)
    turning = nodes.poses @ se3_exp(torch.tensor([0, 0, 0.05, 0, 0, 0.0]) * torch.arange(6.0)[:, None])[None]
    assert float(s2loss.temporal_smoothness(turning, mask)) < 1e-8  # constant yaw rate: still smooth
    jitter = nodes.poses.clone()
    jitter[0, 3, 1, 3] += 0.2
    assert float(s2loss.temporal_smoothness(jitter, mask)) > 1e-3
    mask[0, 0] = False  # only triples with all three frames valid count
    assert float(s2loss.temporal_smoothness(jitter, mask)) > 1e-3
    mask[0, 3] = False  # the jittered frame leaves every triple it is in
    assert float(s2loss.temporal_smoothness(jitter, mask)) == pytest.approx(0.0, abs=1e-10)


def test_regularisers_are_zero_at_identity_and_positive_off_it():
    xi = torch.zeros(2, 4, 6)
    mask = torch.ones(2, 4, dtype=torch.bool)
    sizes = torch.tensor([[4.0, 2, 1.5]] * 2)
    assert float(s2loss.pose_reg(xi, mask, sizes)) == 0.0
    xi[0, 1, 3] = 0.3
    assert float(s2loss.pose_reg(xi, mask, sizes)) == pytest.approx(0.09 / sizes[0].norm().pow(2) / 8, rel=1e-5)
    delta = torch.zeros(10, 13)
    rows = torch.ones(10, dtype=torch.bool)
    assert float(s2loss.gaussian_reg(delta, rows)) == 0.0
    delta[:, 0] = 1.0
    assert float(s2loss.gaussian_reg(delta, rows)) == pytest.approx(1.0)


def test_depth_term_uses_ground_truth_only_where_present():
    depth = torch.full((4, 5, 1), 10.0)
    gt = torch.zeros(4, 5)
    assert s2loss.inverse_depth_l1(depth, gt) is None and s2loss.inverse_depth_l1(depth, None) is None
    gt[0, 0] = 10.0
    assert float(s2loss.inverse_depth_l1(depth, gt)) == 0.0
    gt[0, 0] = 5.0
    assert float(s2loss.inverse_depth_l1(depth, gt)) == pytest.approx(0.1)


def test_flow_consistency_is_zero_with_the_true_flow():
    gauss, nodes = toy_actors(K=1, F=2)
    K = torch.tensor([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    w2c = torch.eye(4)
    w2c[:3, :3] = torch.tensor([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]])  # camera looks along +x (OpenCV)
    w2c[0, 3] = 0.0
    pts = gauss.means.clone()
    pose_t, pose_t1 = nodes.poses[0, 0].clone(), nodes.poses[0, 1].clone()
    pose_t[0, 3], pose_t1[0, 3] = 10.0, 10.5

    def project(pose):
        cam = (pts @ pose[:3, :3].T + pose[:3, 3]) @ w2c[:3, :3].T + w2c[:3, 3]
        pix = cam @ K.T
        return pix[:, :2] / pix[:, 2:]

    uv0, uv1 = project(pose_t), project(pose_t1)
    flow = torch.zeros(480, 640, 2)
    px = uv0.floor().long()
    assert len({tuple(p) for p in px.tolist()}) == len(px), "one point per pixel, so the flow is exact there"
    flow[px[:, 1], px[:, 0]] = uv1 - uv0  # exact flow at each point's pixel
    assert float(s2loss.flow_consistency(pts, pose_t, pose_t1, K, w2c, w2c, flow)) < 1e-6
    wrong = pose_t1.clone()
    wrong[1, 3] += 0.3
    assert float(s2loss.flow_consistency(pts, pose_t, wrong, K, w2c, w2c, flow)) > 1e-3


def test_registered_extra_term_joins_the_render_terms():
    from evolsplat_ns import registry
    from evolsplat_ns.model.stage2.loss import Stage2CompleteLoss, Stage2TermInputs

    def edge_loss(inputs: Stage2TermInputs) -> torch.Tensor:
        grad = lambda im: (im[:, 1:] - im[:, :-1]).abs()  # noqa: E731
        return (grad(inputs.rgb) - grad(inputs.gt)).abs().mean()

    registry.register("losses", "edge", edge_loss)
    try:
        loss = Stage2CompleteLoss(small_config(extra_loss_terms={"edge": 0.5}))
        gt = torch.rand(6, 8, 3)
        flat = Stage2TermInputs(torch.full_like(gt, 0.5), gt, torch.ones(6, 8, 1), None, torch.ones(6, 8, 1), 0)
        terms = loss.render_terms(flat)
        assert set(terms) >= {"s2_rgb", "s2_edge"} and float(terms["s2_edge"]) > 0
        assert float(loss.render_terms(Stage2TermInputs(gt, gt, flat.depth, None, flat.accumulation, 0))["s2_edge"]) == 0
        assert "s2_lpips" not in terms and loss.status()["lpips"].startswith("off")
    finally:
        registry.unregister("losses", "edge")


# -- 4. controller: schedule -------------------------------------------------------------------------

from evolsplat_ns.engine.stage2 import SKIP_REASONS, OnlineStage2Trainer  # noqa: E402


@pytest.mark.parametrize("start, every, expected", [
    (0, 1, list(range(21))),
    (5, 3, [5, 8, 11, 14, 17, 20]),
    (10, 5, [10, 15, 20]),
])
def test_schedule_table_over_steps(start, every, expected):
    ctl = OnlineStage2Trainer(small_config(start_step=start, stage2_frequency=every), None, None, steps_per_epoch=4)
    assert [s for s in range(21) if ctl.should_run(ctl.epoch_of(s), s)] == expected


def test_schedule_by_epoch_and_disabled():
    ctl = OnlineStage2Trainer(small_config(stage2_start_epoch=2, stage2_frequency=3), None, None, steps_per_epoch=4)
    assert ctl.start_step == 8
    assert [s for s in range(21) if ctl.should_run(ctl.epoch_of(s), s)] == [8, 11, 14, 17, 20]
    assert not ctl.should_run(1, 7) and ctl.should_run(2, 8)
    off = OnlineStage2Trainer(Stage2Config(enabled=False), None, None, steps_per_epoch=4)
    assert not any(off.should_run(e, s) for e in range(20) for s in range(100))
    default = OnlineStage2Trainer(Stage2Config(enabled=True), None, None, steps_per_epoch=6)
    assert default.start_step == 60 and default.should_run(10, 65) and not default.should_run(10, 62)


# -- 2, 4, 5. inside training (stage2-lite on the tiny synthetic scenes) -------------------------------

from tiny_run import lite_trainer  # noqa: E402


def stage2_trainer(data, out, load_dir=None, **stage2):
    from dataclasses import replace

    from evolsplat_ns.method_configs import evolsplat_stage2_lite_config

    def configure(cfg):
        cfg.pipeline.model.stage2 = replace(cfg.pipeline.model.stage2, **stage2)

    return lite_trainer(data, out, load_dir=load_dir, config_fn=evolsplat_stage2_lite_config, configure=configure)


def _actor_alpha(model, actors, c2w, K, W, H) -> torch.Tensor:
    return model.rasterize_gaussians(actors, None, c2w, K, W, H)["accumulation"][..., 0]


def test_refined_pose_moves_the_rendered_actor_and_leaves_static_pixels(tiny_dataset, tmp_path):
    trainer = stage2_trainer(tiny_dataset, tmp_path)
    model = trainer.pipeline.model
    trainer.train_step(1)  # not scheduled (every 2nd step): makes the segment the context
    src = model.context.sources
    v = 0
    c2w, K, W, H, t = src.camtoworlds[v], src.intrinsics[v], src.width, src.height, float(src.frame_ids[v])
    with torch.no_grad():
        base = model.render(model.encode(), c2w, K, W, H, time=t)
        refiner, model.stage2 = model.stage2, None
        stage1 = model.render(model.encode(), c2w, K, W, H, time=t)
        model.stage2 = refiner
        assert torch.equal(base["rgb"], stage1["rgb"]), "an untrained refiner renders exactly stage 1"
        refiner.pose_head.out.bias[3] = 3.0  # +0.5 tanh(3) m along every box's own x axis
        moved = model.render(model.encode(), c2w, K, W, H, time=t)
    shift = moved["actors"].means - base["actors"].means
    assert torch.allclose(shift.norm(dim=-1), torch.full((shift.shape[0],), 0.5 * math.tanh(3.0)), atol=1e-4)
    alpha = torch.maximum(_actor_alpha(model, base["actors"], c2w, K, W, H),
                          _actor_alpha(model, moved["actors"], c2w, K, W, H))
    static = alpha == 0
    assert static.any() and (~static).any()
    # untouched up to float summation order (the rasteriser composites every Gaussian in one call)
    assert (moved["rgb"][static] - base["rgb"][static]).abs().max() < 1e-6, "static pixels are untouched"
    assert (moved["rgb"][~static] - base["rgb"][~static]).abs().max() > 1e-3, "the actor moved in the image"


def test_stage2_loss_is_in_the_backward_before_the_optimizer_step(tiny_dataset, tmp_path):
    trainer = stage2_trainer(tiny_dataset, tmp_path)
    model = trainer.pipeline.model
    before = {n: p.detach().clone() for n, p in model.stage2.named_parameters()}
    seen = {}
    step_all = trainer.optimizers.optimizer_scaler_step_all

    def spy(scaler):
        seen["grads"] = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.stage2.pose_head.out.parameters()]
        return step_all(scaler)

    trainer.optimizers.optimizer_scaler_step_all = spy
    _, losses, _ = trainer.train_step(0)
    assert "s2_rgb" in losses and "s2_reg_pose" in losses
    assert seen["grads"] == [True, True], "stage-2 gradients exist when the optimizer steps"
    changed = [n for n, p in model.stage2.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("pose_head.out") for n in changed) and any(n.startswith("gaussian_head.out") for n in changed)
    assert "stage2" in trainer.optimizers.optimizers
    assert trainer.optimizers.optimizers["stage2"].param_groups[0]["initial_lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("mode, trained, frozen", [("gaussian_only", "gaussian_head", "pose_head"),
                                                    ("pose_only", "pose_head", "gaussian_head")])
def test_each_mode_freezes_what_it_says(tiny_dataset, tmp_path, mode, trained, frozen):
    trainer = stage2_trainer(tiny_dataset, tmp_path)
    model, ctl = trainer.pipeline.model, trainer.pipeline.stage2_controller
    ctl.set_training_mode(mode)
    group = trainer.optimizers.optimizers["stage2"].param_groups[0]["params"]
    assert {id(p) for p in group} == {id(p) for p in getattr(model.stage2, trained).parameters()}
    before = {n: p.detach().clone() for n, p in model.stage2.named_parameters()}
    trainer.train_step(0)
    for n, p in model.stage2.named_parameters():
        if n.startswith(frozen):
            assert torch.equal(p.detach(), before[n]), f"{n} is frozen in {mode}"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.stage2.named_parameters() if n.startswith(trained))
    assert ctl.get_statistics()["mode"] == mode
    with pytest.raises(ValueError, match="stage2_training_mode"):
        ctl.set_training_mode("both")


def test_statistics_add_up_under_scripted_failures(tiny_dataset, tmp_path, monkeypatch):
    # flow aggregation off: no flow is used, so none may be reported trusted (the processor's
    # dataset-flow path is tested in test_stage2_processor.py)
    trainer = stage2_trainer(tiny_dataset, tmp_path, stage2_frequency=1, use_optical_flow_aggregation=False)
    model, ctl = trainer.pipeline.model, trainer.pipeline.stage2_controller
    refiner, loss = model.stage2, model.stage2_loss
    real_forward, real_objects, real_terms = refiner.forward, refiner.objects, loss.render_terms

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("scripted")

    def nan_terms(inputs):
        return {k: v * float("nan") for k, v in real_terms(inputs).items()}

    script = {1: ("forward", oom), 2: ("objects", lambda nodes: []), 3: ("render_terms", nan_terms)}
    budget = refiner.point_budget
    for step in range(6):
        if step in script:
            name, fn = script[step]
            target = loss if name == "render_terms" else refiner
            monkeypatch.setattr(target, name, fn)
        networks = [p.detach().clone() for p in model.predictor.parameters()]
        _, losses, _ = trainer.train_step(step)
        if step == 1:  # stage 1 still steps after a stage-2 OOM, with no stage-2 gradient
            assert any(not torch.equal(a, p.detach()) for a, p in zip(networks, model.predictor.parameters()))
            assert all(p.grad is None for p in refiner.parameters())
            assert refiner.point_budget == max(256, budget // 2)
        if step == 3:
            assert not any(k.startswith("s2_") for k in losses)
        monkeypatch.setattr(refiner, "forward", real_forward)
        monkeypatch.setattr(refiner, "objects", real_objects)
        monkeypatch.setattr(loss, "render_terms", real_terms)
    s = ctl.get_statistics()
    assert (s["calls"], s["runs"], s["skipped_oom"], s["skipped_no_objects"], s["skipped_nonfinite"],
            s["skipped_schedule"]) == (6, 3, 1, 1, 1, 0)
    assert s["runs"] + sum(s[f"skipped_{r}"] for r in SKIP_REASONS) == s["calls"]
    assert math.isfinite(s["last_loss"]) and s["time_avg_s"] > 0 and s["objects_avg"] >= 1
    assert s["flow_trusted"] is False and s["segmenter_trusted"] is False


def test_tiny_end_to_end_run_with_stage2_and_exact_resume(tiny_dataset, tmp_path):
    trainer = stage2_trainer(tiny_dataset, tmp_path / "a")
    for step in range(4):
        _, losses, _ = trainer.train_step(step)
        assert all(torch.isfinite(v) for v in losses.values())
    s = trainer.pipeline.stage2_controller.get_statistics()
    assert (s["calls"], s["runs"], s["skipped_schedule"]) == (4, 2, 2)
    assert s["pose_corr_trans_m_avg"] > 0, "the pose head moved off the identity and its corrections were applied"
    assert s["peak_mem_mb_avg"] == 0.0 and 0 < s["time_ratio_refine"] < 1  # CPU: no CUDA memory to measure
    trainer.save_checkpoint(3)
    import json

    written = json.loads((trainer.base_dir / "stage2_stats.json").read_text())
    assert written["runs"] == 2 and written["calls"] == 4 and written["mode"] == "joint"
    model = trainer.pipeline.model
    resumed = stage2_trainer(tiny_dataset, tmp_path / "b", load_dir=trainer.checkpoint_dir)
    for (n, a), b in zip(model.stage2.state_dict().items(), resumed.pipeline.model.stage2.state_dict().values()):
        assert torch.equal(a, b), n
    assert resumed.optimizers.optimizers["stage2"].state_dict()["state"], "the stage-2 optimizer state travels"
    back = resumed.pipeline.stage2_controller.get_statistics()
    assert {k: back[k] for k in ("calls", "runs", "skipped_schedule", "avg_loss")} == \
        {k: s[k] for k in ("calls", "runs", "skipped_schedule", "avg_loss")}, "counters resume"


def test_methods_are_registered_with_the_guide_defaults():
    import tomllib
    from pathlib import Path

    from evolsplat_ns import method_configs as mc

    full, lite = mc.evolsplat_stage2_config(), mc.evolsplat_stage2_lite_config()
    s2 = full.pipeline.model.stage2
    assert (full.method_name, s2.enabled, s2.start_step, s2.stage2_start_epoch, s2.stage2_frequency,
            s2.stage2_training_mode, s2.stage2_memory_efficient) == ("evolsplat-stage2", True, None, 10, 5, "joint", True)
    assert full.optimizers["stage2"]["optimizer"].lr == s2.stage2_learning_rate == 1e-5
    ls2 = lite.pipeline.model.stage2
    assert (lite.method_name, ls2.start_step, ls2.stage2_frequency) == ("evolsplat-stage2-lite", 0, 2)
    assert not mc.evolsplat_config().pipeline.model.stage2.enabled, "plain evolsplat has no stage 2"
    eps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    methods = eps["nerfstudio.method_configs"]
    assert methods["evolsplat-stage2"] == "evolsplat_ns.method_configs:evolsplat_stage2"
    assert methods["evolsplat-stage2-lite"] == "evolsplat_ns.method_configs:evolsplat_stage2_lite"
    assert isinstance(mc.evolsplat_stage2_lite, type(mc.evolsplat_lite))


# -- 6. flow + depth aggregation ---------------------------------------------------------------------

from evolsplat_ns.model.stage2.aggregate import box_increment, flow_correspondences, robust_rigid_fit  # noqa: E402


def _plane_scene(motion: torch.Tensor, H: int = 48, W: int = 64, focal: float = 60.0):
    """A tilted planar patch (a car side) seen by a camera, at t and after the rigid ``motion``
    [4, 4] (segment frame): ground-truth depth at both frames, masks and flow (t -> t+1)."""
    K = torch.tensor([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]], dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 3] = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    n = torch.nn.functional.normalize(torch.tensor([0.3, -0.2, -1.0], dtype=torch.float64), dim=0)
    P0 = c2w[:3, 3] + torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    uv = torch.stack([jj, ii], -1).reshape(-1, 2).double() + 0.5
    rays_cam = torch.cat([uv, torch.ones(H * W, 1, dtype=torch.float64)], -1) @ torch.linalg.inv(K).T

    def hit(normal, point):  # z-depth and segment-frame point where each pixel ray meets the plane
        rays = rays_cam @ c2w[:3, :3].T
        s = ((point - c2w[:3, 3]) @ normal) / (rays @ normal)
        X = c2w[:3, 3] + s[:, None] * rays
        return s * rays_cam[:, 2], X

    def on_patch(X_t):  # the object: a 4 m x 1.5 m patch of the plane around P0
        d = X_t - P0
        return (d[:, 0].abs() < 2.0) & (d[:, 1].abs() < 0.75)

    z0, X0 = hit(n, P0)
    mask_t = on_patch(X0)
    R, t = motion[:3, :3], motion[:3, 3]
    z1, X1 = hit(R @ n, R @ P0 + t)
    mask_t1 = on_patch((X1 - t) @ R)  # back in the frame-t position
    moved = X0 @ R.T + t
    cam = (moved - c2w[:3, 3]) @ c2w[:3, :3]
    q = (cam @ K.T)[:, :2] / cam[:, 2:]
    flow = (q - uv).reshape(H, W, 2)
    # static background far behind: depth everywhere, the object only inside its masks
    depth_t = torch.where(mask_t, z0, torch.full_like(z0, 60.0)).reshape(H, W)
    depth_t1 = torch.where(mask_t1, z1, torch.full_like(z1, 60.0)).reshape(H, W)
    return dict(mask_t=mask_t.reshape(H, W), mask_t1=mask_t1.reshape(H, W), flow=flow, depth_t=depth_t,
                depth_t1=depth_t1, K=K, c2w_t=c2w, c2w_t1=c2w)


def _pose_error(A: torch.Tensor, B: torch.Tensor) -> tuple[float, float]:
    d = torch.linalg.inv(A) @ B
    angle = torch.acos(((d[:3, :3].trace() - 1) / 2).clamp(-1, 1))
    return float(d[:3, 3].norm()), float(angle) * 180 / math.pi


def test_aggregation_recovers_a_known_rigid_motion_from_gt_flow_and_depth():
    motion = se3_exp(torch.tensor([0.0, 0.04, 0.02, 0.6, 0.1, -0.05], dtype=torch.float64))
    scene = _plane_scene(motion)
    X, Y = flow_correspondences(**scene)
    assert X.shape[0] >= 100
    fit = robust_rigid_fit(X, Y, fallback=torch.eye(4, dtype=torch.float64))
    trans, rot = _pose_error(fit.transform, motion)
    assert fit.ok and trans < 1e-3 and rot < 0.05, (trans, rot)

    # 1 px noise on every flow vector and 20 % gross outliers, at a resolution where 1 px is 4 cm at 10 m
    scene = _plane_scene(motion, H=192, W=256, focal=240.0)
    torch.manual_seed(0)
    noisy = dict(scene, flow=scene["flow"] + torch.randn_like(scene["flow"]))
    bad = torch.rand(scene["flow"].shape[:2]) < 0.2
    noisy["flow"] = torch.where(bad[..., None], noisy["flow"] + 8 * torch.randn_like(scene["flow"]), noisy["flow"])
    fit = robust_rigid_fit(*flow_correspondences(**noisy), fallback=torch.eye(4, dtype=torch.float64))
    trans, rot = _pose_error(fit.transform, motion)
    assert fit.ok and trans < 0.05 and rot < 0.5, (trans, rot)


def test_aggregation_falls_back_to_the_box_on_weak_evidence():
    box_t, box_t1 = torch.eye(4, dtype=torch.float64), se3_exp(torch.tensor([0, 0, 0.1, 1.0, 0, 0], dtype=torch.float64))
    fallback = box_increment(box_t, box_t1)
    X = torch.randn(10, 3, dtype=torch.float64)
    fit = robust_rigid_fit(X, X + 1, fallback)
    assert not fit.ok and torch.equal(fit.transform, fallback)
    line = torch.linspace(0, 1, 50, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 2, 3]], dtype=torch.float64)
    fit = robust_rigid_fit(line, line, fallback)
    assert not fit.ok and torch.isfinite(fit.transform).all()


# -- 6. perception: RAFT and SAM2 from user paths, untrusted without weights ---------------------------

from evolsplat_ns.model.stage2 import perception  # noqa: E402


def test_raft_without_weights_is_untrusted_and_pads_odd_sizes(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="untrusted"):
        raft = perception.RaftFlow(perception.RaftConfig("raft_small"))
    assert raft.trusted is False
    im0, im1 = torch.rand(47, 61, 3), torch.rand(47, 61, 3)
    flow = raft(im0, im1)
    assert flow.shape == (47, 61, 2) and torch.isfinite(flow).all()
    path = tmp_path / "raft_small.pth"
    torch.save(raft.net.state_dict(), path)
    loaded = perception.RaftFlow(perception.RaftConfig("raft_small", optical_flow_weights=path))
    assert loaded.trusted is True and torch.equal(loaded(im0, im1), flow)
    with pytest.raises(perception.WeightsNotFoundError, match="optical_flow_weights"):
        perception.RaftFlow(perception.RaftConfig("raft_small", optical_flow_weights=tmp_path / "missing.pth"))


def test_forward_backward_check():
    fw = torch.zeros(8, 10, 2)
    fw[..., 0] = 2.0
    bw = -fw.clone()
    assert perception.forward_backward_valid(fw, bw)[:, :6].all()  # consistent where the target is inside
    bw[2:4] = 3.0
    valid = perception.forward_backward_valid(fw, bw)
    assert not valid[2:4, :6].any() and valid[5:, :6].all()


def test_sam2_missing_checkpoint_is_a_clear_error_and_random_sam2_never_supervises(tmp_path):
    pytest.importorskip("sam2")
    with pytest.raises(perception.WeightsNotFoundError, match="sam2_checkpoint.*github.com/facebookresearch/sam2"):
        perception.Sam2BoxSegmenter(perception.Sam2Config(sam2_checkpoint=tmp_path / "sam2.1_hiera_tiny.pt"))
    torch.manual_seed(0)
    seg = perception.Sam2BoxSegmenter(perception.Sam2Config())
    assert seg.trusted is False
    image, boxes = torch.rand(48, 64, 3), torch.tensor([[5.0, 5, 30, 30], [20, 10, 60, 40]])
    masks, scores = seg(image, boxes)
    assert masks.shape == (2, 48, 64) and masks.dtype == torch.bool and scores.shape == (2,)
    box_masks = torch.zeros(2, 48, 64, dtype=torch.bool)
    box_masks[0, 5:30, 5:30] = box_masks[1, 10:40, 20:60] = True
    assert torch.equal(seg.supervision_masks(image, boxes, box_masks), box_masks)


# -- stage-1 warm start ------------------------------------------------------------------------------


def test_plain_evolsplat_checkpoint_warm_starts_stage2(tiny_dataset, tmp_path_factory, tmp_path):
    from tiny_run import tiny_checkpoint

    config_path = tiny_checkpoint(tiny_dataset, tmp_path_factory)
    ckpt_dir = config_path.parent / "nerfstudio_models"
    saved = torch.load(sorted(ckpt_dir.glob("step-*.ckpt"))[-1], map_location="cpu", weights_only=False)
    assert not any(".stage2." in k for k in saved["pipeline"]), "a plain evolsplat checkpoint has no stage-2 heads"
    trainer = stage2_trainer(tiny_dataset, tmp_path, load_dir=ckpt_dir)
    model = trainer.pipeline.model
    for name, p in model.predictor.named_parameters():
        assert torch.equal(p.detach(), saved["pipeline"][f"_model.predictor.{name}"]), f"stage 1 loaded: {name}"
    for head in (model.stage2.pose_head, model.stage2.gaussian_head):
        assert not head.out.weight.any() and not head.out.bias.any(), "stage-2 heads start at identity"
    assert trainer.pipeline.stage2_warm_start, "the pipeline says it warm-started stage 2 from a stage-1 checkpoint"
    start = trainer._start_step
    _, losses, _ = trainer.train_step(start)
    assert "s2_rgb" in losses and all(torch.isfinite(v) for v in losses.values())
    assert trainer.pipeline.stage2_controller.get_statistics()["runs"] == 1
