"""Any rig, short and slow scenes (issue 12): 1, 2, 6 and 8 cameras (ring rigs face backwards too),
1 to 3 frames at 1 Hz, odd image sizes. For each: inspect, a tiny training run, the ns-eval
evaluation and evolsplat-infer succeed and render every camera."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from tiny_run import lite_trainer

# (cameras, frames): two scenes each (train on 000, evaluate 001), 1 Hz, 37 x 27 pixels.
RIGS = [(1, 3), (2, 2), (6, 1), (8, 3)]
TINY_RIG = dict(scenes=2, width=37, height=27, fps=1.0, lidar_beams=12, lidar_azimuths=192, moving_cars=1,
                seed=21)


def make_rig(root: Path, cameras: int, frames: int, **extra) -> Path:
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    out = root / f"rig{cameras}x{frames}"
    generate_dataset(SynthConfig(**{**TINY_RIG, "cameras": cameras, "frames": frames, **extra}), out)
    return out


@pytest.fixture(scope="module")
def rigs(tmp_path_factory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("rigs")
    return {rig: make_rig(root, *rig) for rig in RIGS}


def eval_views(cameras: int, frames: int) -> int:
    """Views the eval scene renders: every camera of its held-out frame, or each camera held out."""
    return cameras  # 2 or 3 frames: frame 1 held out; 1 frame: each camera in turn


@pytest.mark.parametrize("rig", RIGS, ids=[f"{c}cam-{f}frames" for c, f in RIGS])
def test_inspect_train_eval_infer(rig, rigs, tmp_path):
    from evolsplat_ns.cli.infer import main as infer
    from evolsplat_ns.data.inspect import inspect_dataset

    cameras, frames = rig
    data = rigs[rig]
    report = inspect_dataset(data)
    assert report.ok, report.format()
    assert all(len(s.cameras) == cameras and s.frames == frames for s in report.scenes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adaptation notes, checked in the dataset tests below
        trainer = lite_trainer(data, tmp_path / "run", experiment="rig")
    dataset = trainer.pipeline.datamanager.dataset
    for step in range(2):
        loss, _, metrics = trainer.train_step(step)
        assert math.isfinite(float(loss)), (step, metrics)
    trainer.save_checkpoint(1)
    trainer.config.save_config()

    # ns-eval's evaluation: every held-out view of the eval scene, each camera rendered.
    evaluated = trainer.pipeline.get_average_eval_image_metrics()
    assert evaluated["num_views"] == eval_views(cameras, frames) == len(trainer.pipeline.datamanager.eval_dataset)
    assert math.isfinite(evaluated["psnr"])
    dataset.close()

    config = tmp_path / "run" / "rig" / "evolsplat-lite" / "run" / "config.yml"
    out = infer(["--load-config", str(config), "--data", str(data), "--output-dir", str(tmp_path / "infer"),
                 "--video-frames", "2", "--no-progress"])
    # Every scene is new to inference: both scenes' held-out views, every camera of the rig.
    assert out["num_views"] == 2 * eval_views(cameras, frames)
    assert len(out["per_camera"]) == cameras
    assert all(v["num_views"] == 2 and math.isfinite(v["psnr"]) for v in out["per_camera"].values())
    chosen = out["selection"]["per_scene"]["000"]
    assert chosen["frames"] == frames and len(chosen["cameras"]) == cameras
    assert chosen["hold_out"] == ("cameras" if frames == 1 else "frames")


def test_short_scene_selection_never_uses_a_target_as_source(rigs):
    """Sampling on 1-, 2- and 3-frame scenes: targets never among sources, counts as documented."""
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig

    for (cameras, frames), data in rigs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = MultiSceneDataset(MultiSceneDatasetConfig(data=data, segment_length=12, num_source_keyframes=3,
                                                           num_target_keyframes=1, preload=False))
        assert any("frame(s)" in str(w.message) for w in caught)  # one note per adapted scene
        for _ in range(6):
            s = ds.next_train_sample()
            src = set(zip(s.source.frame_ids.tolist(), s.source.cam_ids.tolist()))
            tgt = set(zip(s.target.frame_ids.tolist(), s.target.cam_ids.tolist()))
            assert src and tgt and not (src & tgt)
            if frames == 1:
                assert len(tgt) == 1 and len(src) == cameras - 1
        for i in range(len(ds.eval_items)):
            s = ds.eval_sample(i)
            src = set(zip(s.source.frame_ids.tolist(), s.source.cam_ids.tolist()))
            tgt = set(zip(s.target.frame_ids.tolist(), s.target.cam_ids.tolist()))
            assert src and tgt and not (src & tgt)
            if frames == 1:  # camera hold-out: that camera is no source of any frame
                assert not ({c for _, c in tgt} & {c for _, c in src})
        plan = ds.selection_report()["001"]
        assert plan["hold_out"] == ("cameras" if frames == 1 else "frames")
        if frames in (2, 3):  # eval_frame_interval 4 would hold out nothing / only the end frame 2
            assert plan["eval_frame_interval"] == 2 and plan["held_out_frames"] == [1]
        ds.close()


def test_camera_hold_out_point_cloud_excludes_the_target_camera(rigs):
    """The held-out camera colours none of its segment's points (its pixels would leak into inputs)."""
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = MultiSceneDataset(MultiSceneDatasetConfig(data=rigs[(6, 1)], preload=False))
    held = [i for i, s in enumerate(ds.segments) if s.held_out_camera is not None]
    assert sorted(ds.segments[i].held_out_camera for i in held) == list(range(6))
    full = next(i for i, s in enumerate(ds.segments) if s.scene_index == 1 and s.held_out_camera is None)
    assert all(len(ds.point_cloud(i)) < len(ds.point_cloud(full)) for i in held[:2])
    ds.close()


def test_one_frame_one_camera_is_a_clear_error(tmp_path):
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig

    data = make_rig(tmp_path, 1, 1, scenes=1)
    with pytest.raises(ValueError, match=r"scene 000 has 1 frame\(s\) and one camera: .*no view is left as a source"):
        MultiSceneDataset(MultiSceneDatasetConfig(data=data, preload=False))


def test_per_camera_sizes_load_at_one_common_size(rigs, tmp_path):
    """A camera of another size (here: camera 1 at 2x) is resized to the first camera's with K scaled."""
    import shutil

    from evolsplat_ns.data import layout as L
    from evolsplat_ns.data.scene import SceneData

    scene = Path(shutil.copytree(rigs[(2, 2)] / "000", tmp_path / "000"))
    lay = L.SceneLayout.scan(scene)
    for t in lay.frames:
        img = L.read_image(lay.image_path(t, 1))
        L.write_image(lay.image_path(t, 1), np.repeat(np.repeat(img, 2, 0), 2, 1))
    intr = L.read_intrinsics(lay.intrinsics_path(1))
    intr[:4] *= 2
    L.write_intrinsics(lay.intrinsics_path(1), intr)
    original = SceneData(rigs[(2, 2)] / "000")
    resized = SceneData(scene)
    assert resized.common_size == (37, 27) and resized.calib[1].full_size == (74, 54)
    assert np.allclose(resized.calib[1].K, original.calib[1].K)
    views = resized.load_views([0], np.eye(4))
    assert views.images.shape == (2, 27, 37, 3)
    assert (views.images[1] - original.load_views([0], np.eye(4)).images[1]).abs().mean() < 0.02
    custom = SceneData(scene, image_size=(21, 15))
    assert custom.load_views([0], np.eye(4)).images.shape == (2, 15, 21, 3)
    again = resized.with_image_size((21, 15))  # what dataset.image_size does to any data source's scene
    assert all(np.allclose(again.calib[c].K, custom.calib[c].K) for c in (0, 1))


def test_lidar_as_it_comes(rigs, tmp_path):
    """Fused (all-zero) origins, zero-length rays and 0-255 intensities: one warning each, no NaN."""
    import shutil

    from evolsplat_ns.data import layout as L
    from evolsplat_ns.data.scene import SceneData

    scene = Path(shutil.copytree(rigs[(2, 2)] / "000", tmp_path / "000"))
    lay = L.SceneLayout.scan(scene)
    for t in lay.frames:
        pts = L.read_lidar(lay.lidar_path(t))
        pts[:, 0:3] = 0.0
        pts[:5, 3:6] = 0.0  # returns at the sensor itself
        pts[:, 11] = np.linspace(0, 255, len(pts))
        L.write_lidar(lay.lidar_path(t), pts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep = SceneData(scene).load_lidar(lay.frames, np.eye(4))
    messages = [str(w.message) for w in caught]
    assert sum("zero-length rays" in m for m in messages) == 1 and sum("(0, 0, 0)" in m for m in messages) == 1
    assert len(sweep.points) == sum(len(L.read_lidar(lay.lidar_path(t))) - 5 for t in lay.frames)
    assert np.isfinite(sweep.points.numpy()).all()
    assert L.normalised_intensity(L.read_lidar(lay.lidar_path(0))).max() == pytest.approx(1.0)


def test_camera_subset_of_a_ring(rigs):
    """dataset.cameras picks any subset of any rig, here the front and the rear camera."""
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = MultiSceneDataset(MultiSceneDatasetConfig(data=rigs[(8, 3)], cameras=(0, 7), preload=False))
    s = ds.next_train_sample()
    assert set(s.source.cam_ids.tolist()) | set(s.target.cam_ids.tolist()) == {0, 7}
    assert ds.scenes[0].camera_names == {0: "FRONT", 7: "REAR"}
    ds.close()


def test_bare_scenes_train_and_evaluate(rigs, tmp_path):
    """No sky masks, no dynamic masks, no instances, no depth/flow, zero distortion: finite throughout."""
    import shutil

    data = Path(shutil.copytree(rigs[(2, 2)], tmp_path / "bare"))
    for scene in data.iterdir():
        for name in ("sky_masks", "dynamic_masks", "instances", "depth", "flow"):
            shutil.rmtree(scene / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = lite_trainer(data, tmp_path / "run", experiment="bare")
    loss, _, _ = trainer.train_step(0)
    assert math.isfinite(float(loss))
    evaluated = trainer.pipeline.get_average_eval_image_metrics()
    assert evaluated["num_views"] == 2 and math.isfinite(evaluated["psnr"])
    trainer.pipeline.datamanager.dataset.close()
