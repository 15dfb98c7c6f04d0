"""``nonfinite_check="deferred"``: a NaN step skipped on the device (fused Adam's ``found_inf``),
reported one step later; finite steps train exactly as with the host check."""

from __future__ import annotations

import math

import pytest
import torch
from nerfstudio.engine.trainer import Trainer

from evolsplat_ns.model.evolsplat_model import SampleLoss
from tiny_run import lite_trainer, params_vector


def _adam_state(trainer) -> list[torch.Tensor]:
    return [t.clone() for opt in trainer.optimizers.optimizers.values() for s in opt.state.values()
            for t in s.values()]


def _nan_loss(monkeypatch, model) -> None:
    monkeypatch.setattr(model, "view_loss",
                        lambda out, gt, step, graphed=False, **kw: {"rgb_loss": out["rgb"].sum() * float("nan")})


def _no_host_check(monkeypatch) -> None:
    monkeypatch.setattr(SampleLoss, "nonfinite", property(lambda self: pytest.fail("the loss was read on the host")))


@pytest.fixture
def deferred(tiny_dataset, tmp_path):
    return lite_trainer(tiny_dataset, tmp_path, nonfinite_check="deferred")


def test_a_nonfinite_step_is_skipped_on_the_device_and_reported_at_the_next(deferred, monkeypatch):
    trainer, model = deferred, deferred.pipeline.model
    assert all(opt.defaults["fused"] for opt in trainer.optimizers.optimizers.values())
    trainer.train_step(0)  # Adam moments and cached offsets exist
    params, moments, offsets = params_vector(trainer), _adam_state(trainer), model.context.node.offset.clone()
    with monkeypatch.context() as m:
        _nan_loss(m, model)
        _no_host_check(m)
        loss, _, _ = trainer.train_step(1)
        assert math.isnan(float(loss)) and trainer.skipped_steps["nonfinite"] == 0, "not read yet"
    assert torch.equal(params, params_vector(trainer)), "no update on a NaN loss"
    assert all(torch.equal(a, b) for a, b in zip(moments, _adam_state(trainer))), "moments and step untouched"
    assert torch.equal(offsets, model.context.node.offset), "the offset cache keeps its values"

    with monkeypatch.context() as m:
        _no_host_check(m)
        trainer.train_step(2)
    assert trainer.skipped_steps["nonfinite"] == 1 and (1, "nonfinite") in trainer.skip_limit._recent
    assert not torch.equal(params, params_vector(trainer)), "the next finite step trains"


def test_the_last_steps_deferred_skip_is_reported_when_training_ends(deferred, monkeypatch):
    _nan_loss(monkeypatch, deferred.pipeline.model)
    deferred.train_step(0)
    monkeypatch.setattr(Trainer, "_after_train", lambda self: None)  # no final checkpoint here
    deferred._after_train()
    assert deferred.skipped_steps["nonfinite"] == 1


def test_finite_steps_train_as_with_the_host_check(tiny_dataset, tmp_path):
    runs = {}
    for check in ("sync", "deferred"):
        trainer = lite_trainer(tiny_dataset, tmp_path / check, nonfinite_check=check, deterministic=True)
        losses = [float(trainer.train_step(s)[0]) for s in range(3)]
        runs[check] = (losses, params_vector(trainer), trainer.pipeline.model.context.node.offset.clone())
    (sync_losses, sync_params, sync_offsets), (losses, params, offsets) = runs["sync"], runs["deferred"]
    assert losses == sync_losses and all(math.isfinite(v) for v in losses)
    assert torch.equal(params, sync_params) and torch.equal(offsets, sync_offsets)


def test_without_fused_adam_the_check_falls_back_to_the_host(tiny_dataset, tmp_path, monkeypatch, capsys):
    def unfused(cfg):
        for opt in cfg.optimizers.values():
            opt["optimizer"].fused = False

    trainer = lite_trainer(tiny_dataset, tmp_path, configure=unfused, nonfinite_check="deferred")
    _nan_loss(monkeypatch, trainer.pipeline.model)
    params = params_vector(trainer)
    _, _, metrics = trainer.train_step(0)
    assert metrics["skipped"] == 1 and trainer.skipped_steps["nonfinite"] == 1, "skipped at once, on the host"
    assert torch.equal(params, params_vector(trainer))
    trainer.train_step(1)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert out.count("nonfinite_check=deferred needs") == 1 and "not fused Adam" in out
