"""evolsplat-finetune: the predicted Gaussians, optimised per scene, fit their training views better;
held-out views scored with the evaluation metrics; outputs never overwritten."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tiny_run import tiny_checkpoint

NEW_SCENE = dict(scenes=1, frames=8, cameras=2, width=64, height=48, lidar_beams=16, lidar_azimuths=256,
                 moving_cars=1, seed=20)


@pytest.fixture(scope="module")
def run_config(tiny_dataset, tmp_path_factory) -> Path:
    return tiny_checkpoint(tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def new_scene(tmp_path_factory) -> Path:
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("finetune_scene")
    generate_dataset(SynthConfig(**NEW_SCENE), out)
    return out / "000"


def test_finetune_fits_training_views(run_config, new_scene, tmp_path):
    from evolsplat_ns.cli.finetune import main

    out = tmp_path / "ft"
    report = main(["--load-config", str(run_config), "--data", str(new_scene), "--output-dir", str(out),
                   "--steps", "30", "--eval-every", "10", "--save-ply"])
    log = json.loads((out / "psnr_log.json").read_text())
    assert list(log) == ["000/seg000"]
    entries = log["000/seg000"]["log"]
    assert [e["step"] for e in entries] == [0, 10, 20, 30]
    assert entries[-1]["train_psnr"] > entries[0]["train_psnr"] + 0.5, entries
    assert all(b["seconds"] > a["seconds"] for a, b in zip(entries, entries[1:]))
    assert log["000/seg000"]["init_seconds"] > 0
    assert json.loads((out / "metrics.json").read_text()) == report
    assert report["num_views"] == 2 * 2  # frames 2 and 6 of 8 held out, 2 cameras
    assert report["initial"]["num_views"] == report["num_views"]
    for key in ("psnr", "ssim", "psnr_sky", "psnr_non_sky", "psnr_static"):
        assert math.isfinite(report[key]) and math.isfinite(report["initial"][key]), key
    assert report["segments"]["000/seg000"]["gaussians"] > 100
    assert (out / "000_seg000.ply").stat().st_size > 0


def test_finetune_refuses_used_output_dir(run_config, new_scene, tmp_path):
    from evolsplat_ns.cli.finetune import main

    out = tmp_path / "used"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["--load-config", str(run_config), "--data", str(new_scene), "--output-dir", str(out), "--steps", "1"])
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == "{}"


def _interrupt_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make the run stop right after its checkpoint at ``at_step`` is written (a killed process)."""
    import evolsplat_ns.inference.finetune as ft

    save = ft._atomic_save

    def save_then_stop(obj, path):
        save(obj, path)
        if obj["step"] == at_step:
            raise KeyboardInterrupt(f"interrupted after step {at_step}")

    monkeypatch.setattr(ft, "_atomic_save", save_then_stop)


def test_resume_gives_the_uninterrupted_parameters_with_densification(run_config, new_scene, tmp_path, monkeypatch):
    """24 steps, densified at steps 16 and 20 (gsplat DefaultStrategy on the reference rasteriser's
    means2d gradients), interrupted after the checkpoint of step 18 and resumed: the same Gaussians
    (count and values), Adam moments and log as one uninterrupted run."""
    import torch

    from evolsplat_ns.inference.finetune import FinetuneConfig, finetune_segment, load_checkpoint
    from evolsplat_ns.inference.loading import DatasetOverrides, load_pipeline

    _, pipeline, _ = load_pipeline(run_config, DatasetOverrides(data=new_scene, all_scenes_eval=True))
    model, dataset = pipeline.model, pipeline.datamanager.dataset
    cfg = FinetuneConfig(steps=24, eval_every=12, checkpoint_every=6, densify=True, densify_start=15,
                         densify_every=4, densify_stop=21, grow_grad2d=2e-5)
    try:
        whole = finetune_segment(model, dataset, 0, cfg, checkpoint=tmp_path / "whole.pt")
        with monkeypatch.context() as m:
            _interrupt_after_checkpoint(m, 18)
            with pytest.raises(KeyboardInterrupt):
                finetune_segment(model, dataset, 0, cfg, checkpoint=tmp_path / "parts.pt")
        assert load_checkpoint(tmp_path / "parts.pt")["step"] == 18
        resumed = finetune_segment(model, dataset, 0, cfg, checkpoint=tmp_path / "parts.pt")
        again = finetune_segment(model, dataset, 0, cfg, checkpoint=tmp_path / "parts.pt")  # finished: restored
    finally:
        dataset.close()

    counts = [e["gaussians"] for e in whole.log]
    print(f"static Gaussians at steps 0, 12, 24: {counts}")
    assert counts[0] == counts[1] and counts[2] != counts[1], f"no densification at steps 16/20: {counts}"
    a, b = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(tmp_path / "parts.pt")
    assert a["step"] == b["step"] == 24
    assert a["gaussians"].keys() == b["gaussians"].keys()
    for k in a["gaussians"]:
        assert torch.equal(a["gaussians"][k], b["gaussians"][k]), k
    for name, opt in a["optimizers"].items():
        for i, st in opt["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], b["optimizers"][name]["state"][i][k]), (name, k)
    assert a["optimizers"]["means"]["state"][0]["exp_avg"].shape[0] == counts[-1]
    assert torch.equal(a["strategy_state"]["grad2d"], b["strategy_state"]["grad2d"])
    strip = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]  # noqa: E731
    assert strip(whole.log) == strip(resumed.log) == strip(again.log)
    assert whole.views == resumed.views == again.views
    assert again.gaussians is None and torch.equal(again.static.means, whole.static.means)


def test_finetune_resume_cli(run_config, new_scene, tmp_path):
    from evolsplat_ns.cli.finetune import main

    out = tmp_path / "ft"
    base = ["--load-config", str(run_config), "--data", str(new_scene), "--output-dir", str(out),
            "--eval-every", "0", "--checkpoint-every", "2"]
    with pytest.raises(FileNotFoundError, match="no evolsplat-finetune run to resume"):
        main(base + ["--steps", "2", "--resume"])
    first = main(base + ["--steps", "2"])
    with pytest.raises(FileExistsError, match="--resume"):
        main(base + ["--steps", "2"])
    with pytest.raises(ValueError, match="--seed 0 -> 3"):
        main(base + ["--steps", "4", "--seed", "3", "--resume"])
    longer = main(base + ["--steps", "4", "--resume"])
    log = json.loads((out / "psnr_log.json").read_text())["000/seg000"]["log"]
    assert [e["step"] for e in log] == [0, 2, 4]
    assert longer["steps"] == 4 and longer["initial"] == first["initial"]
    assert (out / "checkpoints" / "000_seg000.pt").is_file()
