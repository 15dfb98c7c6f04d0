"""The EVolSplat training step: per-target backward, checkpoints and resume, skipped steps."""

from __future__ import annotations

import math
from dataclasses import replace
import warnings
from pathlib import Path

import pytest
import torch

from evolsplat_ns.data.types import PointCloud
from evolsplat_ns.method_configs import evolsplat_lite_config
from tiny_run import lite_trainer as make_trainer
from tiny_run import params_vector


@pytest.fixture(scope="module")
def trainer(tiny_dataset, tmp_path_factory):
    return make_trainer(tiny_dataset, tmp_path_factory.mktemp("runs"))


def test_per_target_backward_matches_single_graph(trainer):
    """One backward per target (graphs freed in between) gives the single-graph gradients."""
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    model.eval()  # BatchNorm statistics must not change between the two passes
    sample, batch = pipeline.datamanager.next_train(0)
    sample.target = sample.target.select([0, 1])  # two targets exercise the accumulation

    trainer.optimizers.zero_grad_all()
    trainer._sample_loss(sample, batch, step=1)
    split = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    trainer.optimizers.zero_grad_all()
    losses, _ = pipeline.sample_loss(sample, batch, step=1)
    sum(losses.values()).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.train()

    assert split.keys() == joint.keys() and len(split) > 10
    assert any(k.startswith("predictor.volume_net") for k in split)
    for name in split:
        torch.testing.assert_close(split[name], joint[name], rtol=1e-4, atol=1e-7, msg=name)


def test_training_samples_travel_as_uint8_and_train_as_their_float_images(trainer):
    """The datamanager's training samples hold uint8 images (a quarter of the bytes to pin and copy);
    the model turns them into float32 on its device, so a step on them gives the float step's
    losses and gradients exactly."""
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    model.eval()
    sample, batch = pipeline.datamanager.next_train(0)
    assert sample.source.images.dtype == torch.uint8 and sample.target.images.dtype == torch.uint8
    sample.target = sample.target.select([0, 1])
    as_float = replace(sample, source=replace(sample.source, images=sample.source.images.float() / 255),
                       target=replace(sample.target, images=sample.target.images.float() / 255))
    packed_grads, packed_losses = _step_gradients(trainer, sample, batch)
    float_grads, float_losses = _step_gradients(trainer, as_float, batch)
    model.train()
    assert packed_losses.keys() == float_losses.keys() and packed_grads.keys() == float_grads.keys()
    for k in packed_losses:
        assert torch.equal(packed_losses[k], float_losses[k]), k
    for name in packed_grads:
        assert torch.equal(packed_grads[name], float_grads[name]), name


def _step_gradients(trainer, sample, batch) -> tuple[dict, dict]:
    trainer.optimizers.zero_grad_all()
    result = trainer._sample_loss(sample, batch, step=1)
    grads = {n: p.grad.clone() for n, p in trainer.pipeline.model.named_parameters() if p.grad is not None}
    return grads, {k: v.detach().clone() for k, v in result.losses.items()}


def test_batched_targets_give_the_per_target_gradients(trainer, monkeypatch):
    """batch_targets (every target in one draw, one backward) = per-target backward, losses and
    gradients; each target still sees only its own Gaussians (a target's rows in another's
    camera would change both)."""
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    model.eval()
    sample, batch = pipeline.datamanager.next_train(0)
    sample.target = sample.target.select([0, 1, 2])
    per_target, per_target_losses = _step_gradients(trainer, sample, batch)
    drawn = []
    real = model.render_targets
    monkeypatch.setattr(model, "render_targets", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    monkeypatch.setattr(model.config, "batch_targets", True)
    batched, batched_losses = _step_gradients(trainer, sample, batch)
    model.train()

    assert len(drawn) == 1, "the batched path ran"
    assert all(len(out["actors"]) for out in drawn[0]), "moving actors are in every target's rows"
    assert drawn[0][0]["background_rgb"] is not None
    assert per_target.keys() == batched.keys() and len(batched) > 10
    for k in per_target_losses:
        torch.testing.assert_close(batched_losses[k], per_target_losses[k], rtol=1e-5, atol=1e-7, msg=k)
    for name in per_target:
        torch.testing.assert_close(batched[name], per_target[name], rtol=1e-4, atol=1e-7, msg=name)


def test_batched_targets_fall_back_with_the_sky_loss_and_say_so_once(trainer, monkeypatch):
    model = trainer.pipeline.model
    monkeypatch.setattr(model.config, "batch_targets", True)
    assert model._batch_targets(backward=lambda loss: None)
    assert not model._batch_targets(backward=None)  # no per-step backward: one graph anyway
    monkeypatch.setattr(model.config, "sky_loss_weight", 1.0)
    monkeypatch.setattr(model, "_batch_fallbacks", set())
    with pytest.warns(UserWarning, match="sky_loss_weight"):
        assert not model._batch_targets(backward=lambda loss: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not model._batch_targets(backward=lambda loss: None)


def test_step_updates_weights_and_offset_cache(trainer):
    before = params_vector(trainer)
    loss, loss_dict, metrics = trainer.train_step(2)
    assert math.isfinite(float(loss)) and "rgb_loss" in loss_dict and metrics["num_gaussians"] > 0
    assert not torch.equal(before, params_vector(trainer))
    node = trainer.pipeline.model.context.node
    assert node.offset.abs().sum() > 0, "predicted offsets are cached for the next step"
    assert node.offset.abs().max() <= trainer.pipeline.model.config.offset_max + 1e-6


def test_nonfinite_loss_skips_step(trainer, monkeypatch):
    model = trainer.pipeline.model
    before = params_vector(trainer)
    monkeypatch.setattr(model, "view_loss", lambda out, gt, step, graphed=False, **kw: {"rgb_loss": out["rgb"].sum() * float("nan")})
    loss, _, metrics = trainer.train_step(3)
    assert math.isnan(float(loss)) and metrics["skipped"] == 1
    assert trainer.skipped_steps["nonfinite"] == 1
    assert torch.equal(before, params_vector(trainer)), "no optimizer step on a NaN loss"


@pytest.mark.parametrize("bad_target", [0, -1])
def test_one_nonfinite_target_skips_the_step(trainer, monkeypatch, bad_target):
    """A NaN in the first or the last target's loss alone (each target back-propagated on its
    own) still skips the whole step."""
    model = trainer.pipeline.model
    real, calls = model.view_loss, []
    targets = len(trainer.pipeline.datamanager.next_train(3)[0].target)

    def view_loss(out, gt, step, graphed=False, **kw):
        terms = real(out, gt, step, graphed=graphed, **kw)
        calls.append(1)
        if len(calls) - 1 == bad_target % targets:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(model, "view_loss", view_loss)
    before, skipped = params_vector(trainer), trainer.skipped_steps["nonfinite"]
    loss, _, metrics = trainer.train_step(3)
    assert len(calls) == targets > 1
    assert math.isnan(float(loss)) and metrics["skipped"] == 1
    assert trainer.skipped_steps["nonfinite"] == skipped + 1
    assert torch.equal(before, params_vector(trainer)), "no optimizer step when one target's loss is NaN"


def test_oom_on_a_segment_skips_step(trainer, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer.pipeline.model, "encode", oom)
    trainer.train_step(4)
    assert trainer.skipped_steps["oom"] == 1


def test_empty_segment_is_skipped_with_message(trainer, monkeypatch, capsys):
    dm = trainer.pipeline.datamanager
    empty = PointCloud(torch.zeros(0, 3), torch.zeros(0, 3))
    trainer.pipeline.model.forget_segments()
    monkeypatch.setattr(dm, "point_cloud_for", lambda sample: empty)
    real_next = dm.next_train
    monkeypatch.setattr(dm, "next_train", lambda step: (real_next(step)[0], {"point_cloud": empty}))
    trainer.train_step(5)
    assert trainer.skipped_steps["empty_segment"] == 1
    assert "point cloud is empty" in capsys.readouterr().out


@pytest.mark.parametrize("refresh_every", [1, 4])
def test_resume_gives_identical_next_loss(tiny_dataset, tmp_path, refresh_every):
    """Stop at step k, resume with --load-dir: steps k+1 and k+2 have the uninterrupted run's
    losses. With volume_refresh_every 4, step k+1 reuses the voxel set built at step 0 (the
    checkpoint's); k+2 starts the next segment."""
    k = 2

    def configure(cfg):
        cfg.pipeline.model.volume_refresh_every = refresh_every

    straight = make_trainer(tiny_dataset, tmp_path / "a", configure=configure)
    losses = [float(straight.train_step(s)[0]) for s in range(k + 3)]

    first = make_trainer(tiny_dataset, tmp_path / "b", configure=configure)
    for s in range(k + 1):
        first.train_step(s)
    first.save_checkpoint(k)
    ckpt_dir = first.checkpoint_dir
    assert (ckpt_dir / f"step-{k:09d}.ckpt").is_file()

    resumed = make_trainer(tiny_dataset, tmp_path / "c", load_dir=ckpt_dir, configure=configure)
    assert resumed._start_step == k + 1
    assert len(resumed.pipeline.model.segments) > 0, "segment nodes (offset caches) travel in the checkpoint"
    assert float(resumed.train_step(k + 1)[0]) == pytest.approx(losses[k + 1], rel=1e-5)
    cache = resumed.pipeline.model.context.segment.volume_cache  # steps 0-3 share a segment
    assert (cache.misses, cache.stale_hits) == ((0, 1) if refresh_every == 4 else (1, 0))
    assert float(resumed.train_step(k + 2)[0]) == pytest.approx(losses[k + 2], rel=1e-5)


def test_model_only_checkpoint_loads_for_inference(trainer, tmp_path):
    """A checkpoint holding only the pipeline (no optimizer state) renders after loading."""
    state = {"pipeline": trainer.pipeline.state_dict(), "step": 7}
    path = tmp_path / "model_only.ckpt"
    torch.save(state, path)
    fresh = evolsplat_lite_config().pipeline
    fresh.datamanager.data = trainer.config.pipeline.datamanager.data
    pipe = fresh.setup(device="cpu", test_mode="inference")
    pipe.load_pipeline(torch.load(path, map_location="cpu")["pipeline"], 7)
    assert pipe.model.segments.keys() == trainer.pipeline.model.segments.keys()
    metrics, images = pipe.get_eval_image_metrics_and_images(step=7)
    assert math.isfinite(metrics["psnr"]) and images["img"].ndim == 3


def test_cpu_safe_device_defaults(monkeypatch):
    """evolsplat-lite picks the CPU without CUDA; asking for CUDA without it is one line naming the fix."""
    import torch

    from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evolsplat_lite_config().machine.device_type == "cpu"
    cfg = evolsplat_config()
    assert cfg.machine.device_type == "cuda"
    with pytest.raises(SystemExit, match=r"CUDA is not available on this machine .*pass --machine.device-type cpu$") as e:
        cfg.setup(local_rank=0, world_size=1)
    assert "\n" not in str(e.value.code)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evolsplat_lite_config().machine.device_type == "cuda"


def test_adam_is_fused_only_when_every_parameter_is_on_one_kind_of_device():
    from evolsplat_ns.engine.trainer import AdamConfig

    opt = AdamConfig(lr=1e-3, eps=1e-15).setup([torch.nn.Parameter(torch.zeros(3))])
    assert opt.param_groups[0]["fused"] and opt.param_groups[0]["eps"] == 1e-15  # torch's CPU kernel
    assert not AdamConfig(fused=False).setup([torch.nn.Parameter(torch.zeros(3))]).param_groups[0]["fused"]
    mixed = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not AdamConfig().setup(mixed).param_groups[0]["fused"]


def test_sparse_conv_tf32_switch_reaches_spconv():
    from spconv import constants

    from evolsplat_ns.model.precision import allow_sparse_conv_tf32

    before = constants.SPCONV_ALLOW_TF32
    try:
        allow_sparse_conv_tf32(True)
        assert constants.SPCONV_ALLOW_TF32 is True
        allow_sparse_conv_tf32(False)
        assert constants.SPCONV_ALLOW_TF32 is False
    finally:
        constants.SPCONV_ALLOW_TF32 = before
