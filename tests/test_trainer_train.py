"""nerfstudio's own ``Trainer.train`` (what ``ns-train`` runs) on a tiny evolsplat-lite config:
the loop, its callbacks, ``save_dataparser_transform`` and the checkpoint writer all work with our
pipeline (the other tests drive ``train_step`` directly)."""

from __future__ import annotations

import json

from tiny_run import lite_trainer


def test_nerfstudio_trainer_train_runs_and_saves(tiny_dataset, tmp_path):
    def configure(cfg):
        cfg.max_num_iterations = 3
        cfg.steps_per_save = 2
        cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10_000

    trainer = lite_trainer(tiny_dataset, tmp_path, experiment="train_loop", configure=configure)
    trainer.train()
    run = tmp_path / "train_loop" / "evolsplat-lite" / "run"
    assert sorted(p.name for p in (run / "nerfstudio_models").glob("step-*.ckpt")), "no checkpoint written"
    transform = json.loads((run / "dataparser_transforms.json").read_text())
    assert transform["scale"] == 1.0 and len(transform["transform"]) == 3


def test_max_train_seconds_stops_checkpoints_the_last_step_and_resumes(tiny_dataset, tmp_path):
    """A zero-second limit stops nerfstudio's loop after its first step with a checkpoint of that
    step (not of the next, untrained one); ``--load-dir`` then continues from the step after it."""
    from evolsplat_ns.engine import checkpoints

    def configure(cfg):
        cfg.max_num_iterations = 50
        cfg.steps_per_save = 1000
        cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10_000

    trainer = lite_trainer(tiny_dataset, tmp_path, experiment="limit", configure=configure, max_train_seconds=0.0)
    trainer.train()
    folder = tmp_path / "limit" / "evolsplat-lite" / "run" / "nerfstudio_models"
    found = checkpoints.list_checkpoints(folder)
    assert [step for step, _ in found] == [0]
    trainer.pipeline.datamanager.dataset.close()
    resumed = lite_trainer(tiny_dataset, tmp_path, experiment="limit", configure=configure,
                           max_train_seconds=0.0, load_dir=folder)
    assert resumed._start_step == 1
    resumed.train()
    assert [step for step, _ in checkpoints.list_checkpoints(folder)][-1] == 1
