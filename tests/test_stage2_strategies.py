"""The guide's advanced stage-2 examples with our API: a loss subclass registered by name, a
controller adapting its frequency to memory use (scripted readings), an epoch-phased strategy."""

from __future__ import annotations

import torch

from evolsplat_ns import registry
from evolsplat_ns.engine.stage2_strategies import (
    EpochPhasedStage2Trainer, MemoryAdaptiveStage2Trainer, Phase, make_controller,
)
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.model.stage2.loss import Stage2CompleteLoss, Stage2TermInputs, stage2_loss_class


class EdgeStage2Loss(Stage2CompleteLoss):
    """The complete loss plus an image-gradient (edge) term: the docs/stage2.md example."""

    edge_weight = 0.1

    def render_terms(self, inputs: Stage2TermInputs) -> dict[str, torch.Tensor]:
        terms = super().render_terms(inputs)
        grad = lambda im: (im[:, 1:] - im[:, :-1]).abs()  # noqa: E731
        terms["s2_edge"] = self.edge_weight * (grad(inputs.rgb) - grad(inputs.gt)).abs().mean()
        return terms


def test_loss_subclass_registered_by_name_extends_the_complete_loss():
    registry.register("losses", "stage2_edge", EdgeStage2Loss)
    try:
        config = Stage2Config(enabled=True, stage2_loss="stage2_edge")
        loss = stage2_loss_class(config.stage2_loss)(config)
        gt = torch.rand(6, 8, 3)
        flat = Stage2TermInputs(torch.full_like(gt, 0.5), gt, torch.ones(6, 8, 1), None, torch.ones(6, 8, 1), 0)
        terms = loss.render_terms(flat)
        assert {"s2_rgb", "s2_edge"} <= set(terms) and float(terms["s2_edge"]) > 0
        perfect = loss.render_terms(Stage2TermInputs(gt, gt, flat.depth, None, flat.accumulation, 0))
        assert float(perfect["s2_edge"]) == 0 and float(perfect["s2_rgb"]) == 0
    finally:
        registry.unregister("losses", "stage2_edge")
    assert stage2_loss_class("complete") is Stage2CompleteLoss


def test_memory_adaptive_controller_backs_off_under_memory_pressure():
    readings = iter([0.3] * 6 + [0.9] * 12 + [0.3] * 30)
    ctl = MemoryAdaptiveStage2Trainer(Stage2Config(enabled=True, start_step=0, stage2_frequency=2), None, None,
                                      steps_per_epoch=10, memory=lambda: next(readings))
    runs = [s for s in range(48) if ctl.should_run(ctl.epoch_of(s), s)]
    low, high, back = [s for s in runs if s < 6], [s for s in runs if 6 <= s < 18], [s for s in runs if s >= 30]
    assert low == [0, 2, 4], "every stage2_frequency steps while memory is low"
    assert len(high) <= 2, f"rare under pressure: {high}"
    assert all(b - a == 2 for a, b in zip(back, back[1:])), f"back to the configured frequency: {back}"
    assert ctl.frequency == 2


def test_epoch_phases_turn_stage2_on_switch_mode_and_frequency(tiny_dataset, tmp_path):
    from test_stage2 import stage2_trainer

    trainer = stage2_trainer(tiny_dataset, tmp_path, stage2_controller="epoch_phases")
    pipeline = trainer.pipeline
    assert isinstance(pipeline.stage2_controller, EpochPhasedStage2Trainer)
    phases = [Phase(0, enabled=False), Phase(1, mode="gaussian_only", frequency=3), Phase(2, mode="joint", frequency=1)]
    ctl = make_controller("epoch_phases", pipeline.model.config.stage2, pipeline.model, trainer.optimizers,
                          steps_per_epoch=4, phases=phases)
    table = []
    for step in range(12):
        run = ctl.should_run(ctl.epoch_of(step), step)
        group = trainer.optimizers.optimizers["stage2"].param_groups[0]["params"]
        table.append((step, run, pipeline.model.stage2.mode, len(group)))
    assert [s for s, run, _, _ in table if run] == [4, 7, 8, 9, 10, 11]
    head = {id(p) for p in pipeline.model.stage2.gaussian_head.parameters()}
    assert table[5][2] == "gaussian_only" and table[5][3] == len(head), "the pose head left the optimizer"
    assert table[9][2] == "joint" and table[9][3] == len(list(pipeline.model.stage2.parameters()))
    assert ctl.config.stage2_frequency == 1
