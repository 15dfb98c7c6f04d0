"""evolsplat-infer: zero-shot evaluation of unseen scenes, grid, camera-path video, timing, no-overwrite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_run import tiny_checkpoint

# Two scenes the run never saw (other seeds than the training data); 8 frames hold out 2 each.
NEW_SCENES = dict(scenes=2, frames=8, cameras=3, width=64, height=48, lidar_beams=16, lidar_azimuths=256,
                  moving_cars=1, seed=10)


@pytest.fixture(scope="module")
def run_config(tiny_dataset, tmp_path_factory) -> Path:
    return tiny_checkpoint(tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def new_scenes(tmp_path_factory) -> Path:
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("new_scenes")
    generate_dataset(SynthConfig(**NEW_SCENES), out)
    return out


def infer(run_config: Path, data: Path, out: Path, *extra: str) -> dict:
    from evolsplat_ns.cli.infer import main

    return main(["--load-config", str(run_config), "--data", str(data), "--output-dir", str(out),
                 "--video-frames", "3", "--no-progress", *extra])


def check_report(report: dict, out: Path) -> None:
    assert json.loads((out / "metrics.json").read_text()) == report
    assert set(report["per_scene"]) == {"000", "001"}
    assert report["num_views"] == 2 * 2 * 3  # scenes x held-out frames x cameras
    for key in ("psnr", "ssim"):
        assert math.isfinite(report[key]) and all(math.isfinite(s[key]) for s in report["per_scene"].values())
    assert isinstance(report["lpips_available"], bool)
    assert ("lpips" in report) == report["lpips_available"]
    timing = report["timing"]
    assert timing["encode_ms"]["count"] == 4 and timing["render_ms"]["count"] == 12
    assert all(math.isfinite(t["mean_ms"]) and t["mean_ms"] > 0 for t in (timing["encode_ms"], timing["render_ms"]))
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (8 * 48, 3 * 64, 3)  # default 8 rows of prediction | ground truth | error
    video = Path(report["video"])
    assert video.is_file() if video.suffix == ".mp4" else len(list(video.glob("*.png"))) == 3


def test_zero_shot_trained_and_untrained(run_config, new_scenes, tmp_path):
    trained = infer(run_config, new_scenes, tmp_path / "trained")
    check_report(trained, tmp_path / "trained")
    assert not trained["untrained"] and trained["checkpoint"].endswith(".ckpt")
    untrained = infer(run_config, new_scenes, tmp_path / "untrained", "--untrained")
    check_report(untrained, tmp_path / "untrained")
    assert untrained["untrained"] and untrained["checkpoint"] is None


def test_refuses_to_overwrite_outputs(run_config, new_scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        infer(run_config, new_scenes, out)
    assert (out / "metrics.json").read_text() == "{}" and not (out / "grid.png").exists()


def test_new_scenes_never_reuse_training_nodes(run_config, new_scenes):
    """Both datasets name their scenes 000, 001: checkpointed nodes must not stand in for new ones."""
    from evolsplat_ns.inference.loading import DatasetOverrides, load_pipeline

    _, pipeline, _ = load_pipeline(run_config, DatasetOverrides(data=new_scenes, all_scenes_eval=True))
    try:
        assert len(pipeline.model.segments) == 0 and pipeline.model.context is None
        dataset = pipeline.datamanager.dataset
        assert dataset.eval_scene_ids == {0, 1}  # every new scene is an eval scene ...
        assert {dataset.segments[i].scene_index for i, _ in dataset.eval_items} == {0, 1}  # ... and scored
    finally:
        pipeline.datamanager.dataset.close()


def test_video_falls_back_to_png_frames(tmp_path, monkeypatch, capsys):
    from evolsplat_ns.inference import video

    monkeypatch.setattr(video, "ffmpeg_available", lambda: (False, "imageio-ffmpeg unavailable (test)"))
    frames = [np.full((6, 8, 3), i * 40, dtype=np.uint8) for i in range(3)]
    written = video.write_video(frames, tmp_path / "path.mp4", fps=5)
    assert written == tmp_path / "path" and len(list(written.glob("*.png"))) == 3
    assert "PNG frames" in capsys.readouterr().out


def test_camera_path_interpolates_between_frames():
    from evolsplat_ns.geometry import interpolate_pose

    a = np.eye(4)
    b = np.eye(4)
    b[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90 degrees about z
    b[:3, 3] = [2, 0, 0]
    mid = interpolate_pose(a, b, 0.5)
    np.testing.assert_allclose(mid[:3, 3], [1, 0, 0])
    c = np.cos(np.pi / 4)
    np.testing.assert_allclose(mid[:3, :3], [[c, -c, 0], [c, c, 0], [0, 0, 1]], atol=1e-12)
