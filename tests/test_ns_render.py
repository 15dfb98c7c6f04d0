"""nerfstudio's ``ns-render`` on a tiny trained run: interpolate (eval and train poses), spiral,
camera-path and dataset (test and train splits), in-process through its own command classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_run import tiny_checkpoint


@pytest.fixture(scope="module")
def run_config(tiny_dataset, tmp_path_factory):
    return tiny_checkpoint(tiny_dataset, tmp_path_factory)


def read_frames(path, width: int = 64, height: int = 48) -> np.ndarray:
    """[N, H, W, 3] uint8 frames of a ``width`` x ``height`` video, decoded by the ffmpeg on PATH
    (mediapy's and imageio's readers fail to parse ffmpeg 9's header)."""
    import shutil
    import subprocess

    raw = subprocess.run([shutil.which("ffmpeg"), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def test_ffmpeg_is_on_path_after_the_plugin_loads():
    import shutil

    import evolsplat_ns.method_configs  # noqa: F401  (the plugin module every ns-* tool loads)

    assert shutil.which("ffmpeg"), "ns-render needs an ffmpeg on PATH"


@pytest.mark.parametrize("pose_source", ["eval", "train"])
def test_interpolate_writes_a_video(run_config, tmp_path, pose_source):
    from nerfstudio.scripts.render import RenderInterpolated

    out = tmp_path / f"{pose_source}.mp4"
    RenderInterpolated(load_config=run_config, output_path=out, pose_source=pose_source,
                       interpolation_steps=1, frame_rate=4).main()
    frames = read_frames(out)
    assert len(frames) >= 2
    assert frames.std() > 1.0, "frames are not blank"


def test_spiral_writes_frames_around_the_shown_segment(run_config, tmp_path):
    from nerfstudio.scripts.render import SpiralRender

    out = tmp_path / "spiral.mp4"
    SpiralRender(load_config=run_config, output_path=out, seconds=1.0, frame_rate=3,
                 output_format="images", image_format="png").main()
    frames = sorted((tmp_path / "spiral").glob("*.png"))
    assert len(frames) == 3


def test_camera_path_renders_the_given_cameras(run_config, tmp_path):
    from nerfstudio.scripts.render import RenderCameraPath
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(run_config, test_mode="inference")
    cams = pipeline.datamanager.train_dataset.cameras
    path = {"camera_type": "perspective", "render_height": 48, "render_width": 64, "seconds": 1.0,
            "camera_path": [{"camera_to_world": torch.cat([c, torch.tensor([[0, 0, 0, 1.0]])]).flatten().tolist(),
                             "fov": 60.0, "aspect": 64 / 48} for c in cams.camera_to_worlds[:2]]}
    (tmp_path / "path.json").write_text(json.dumps(path))
    out = tmp_path / "path.mp4"
    RenderCameraPath(load_config=run_config, camera_path_filename=tmp_path / "path.json", output_path=out).main()
    assert len(read_frames(out)) == 2


def test_dataset_test_split_matches_the_evaluator(run_config, tmp_path):
    """Every held-out view, rendered in its own sample's context: identical to what evaluation
    renders for it, whichever segment is shown."""
    from PIL import Image
    from nerfstudio.scripts.render import DatasetRender
    from nerfstudio.utils.eval_utils import eval_setup

    DatasetRender(load_config=run_config, output_path=tmp_path, split="test", image_format="png",
                  rendered_output_names=["rgb", "gt-rgb", "depth"]).main()
    _, pipeline, _, _ = eval_setup(run_config, test_mode="test")
    views = pipeline.datamanager.eval_dataset
    files = views._dataparser_outputs.image_filenames
    rgb = sorted((tmp_path / "test" / "rgb").rglob("*.png"))
    assert len(rgb) == len(views) == len(files) > 0
    assert len(sorted((tmp_path / "test" / "depth").rglob("*.png"))) == len(views)
    # The first held-out view as the evaluation loop (ns-eval) renders it equals the written image.
    from evolsplat_ns.engine.evaluation import held_out_views

    first = next(held_out_views(pipeline.model, pipeline.datamanager))
    expected = (first.outputs["rgb"].clamp(0, 1) * 255).round().byte().numpy()
    batch = {"image": first.sample.target.images[first.view]}
    root = Path(os.path.commonpath(files))  # how ns-render names its outputs
    written = np.asarray(Image.open((tmp_path / "test" / "rgb" / files[0].relative_to(root)).with_suffix(".png")))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    gt = np.asarray(Image.open((tmp_path / "test" / "gt-rgb" / files[0].relative_to(root)).with_suffix(".png")))
    assert np.abs(gt.astype(int) - (batch["image"].numpy() * 255).round().astype(int)).max() <= 1


def test_dataset_train_split_renders_the_shown_segment(run_config, tmp_path):
    from nerfstudio.scripts.render import DatasetRender

    DatasetRender(load_config=run_config, output_path=tmp_path, split="train", image_format="png",
                  rendered_output_names=["rgb"]).main()
    assert len(list((tmp_path / "train" / "rgb").rglob("*.png"))) > 0


def test_chosen_segment_by_environment(run_config, monkeypatch):
    from nerfstudio.utils.eval_utils import eval_setup

    monkeypatch.setenv("EVOLSPLAT_SEGMENT", "002/seg000")
    _, pipeline, _, _ = eval_setup(run_config, test_mode="test")
    assert str(pipeline.model.context.key) == "002/seg000"
    assert str(pipeline.datamanager.dataset.key(pipeline.datamanager.train_dataset.segment_index)) == "002/seg000"
    # Held-out views of the shown scene are posed in the shown segment's frame.
    cams = pipeline.datamanager.eval_dataset.cameras
    assert (cams.metadata["frame_segment"] == pipeline.shown.segment_index).all()
    monkeypatch.setenv("EVOLSPLAT_SEGMENT", "nope")
    with pytest.raises(ValueError, match="EVOLSPLAT_SEGMENT='nope' names no segment"):
        eval_setup(run_config, test_mode="test")


def test_entry_point_filters_only_known_third_party_noise(caplog):
    import logging
    import warnings

    from evolsplat_ns._compat.process import prepare_process

    prepare_process()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        prepare_process()  # re-installs our filters inside this context
        warnings.warn("`torch.cuda.amp.custom_fwd(args...)` is deprecated.", FutureWarning)
        warnings.warn("segment 000/seg000 has no points")  # ours: must stay visible
    assert [str(w.message) for w in seen] == ["segment 000/seg000 has no points"]
    with caplog.at_level(logging.WARNING, logger="torch.fx._symbolic_trace"):
        logging.getLogger("torch.fx._symbolic_trace").warning(
            "is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use ...")
    assert not caplog.records
