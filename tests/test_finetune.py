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
