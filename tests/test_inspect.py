"""``evolsplat-data inspect``: the summary of a good dataset, and every kind of bad input named by
file and problem (never a bare traceback), with the dataset loaders refusing the same input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from evolsplat_ns.cli.data import main
from evolsplat_ns.data import layout as L
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.segments import split_segments

from conftest import TINY_SYNTH

BROKEN_SCENE = "001"


@pytest.fixture
def data_with_broken_scene(tiny_dataset, tmp_path) -> Path:
    """A dataset folder whose scene ``BROKEN_SCENE`` is a private copy a test may break; the other
    scenes link to the shared (read-only by convention) ones, which keeps setup fast."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for scene in sorted(tiny_dataset.iterdir()):
        if scene.name == BROKEN_SCENE:
            shutil.copytree(scene, data / scene.name)
        else:
            (data / scene.name).symlink_to(scene, target_is_directory=True)
    return data


def run_inspect(capsys, data: Path, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``evolsplat-data inspect --data DATA ARGS``."""
    rc = main(["inspect", "--data", str(data), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def load_everything(root: Path) -> None:
    """Read every file of a scene the way training does (calibration, poses, images, masks, LiDAR)."""
    scene = SceneData(root)
    scene.load_views(scene.frames, np.eye(4), depth=True, sky=True, dynamic=True)
    scene.load_lidar(scene.frames, np.eye(4))


# ----------------------------------------------------------------------------- a good dataset


def test_summary_of_good_dataset(capsys, tiny_dataset):
    rc, out, err = run_inspect(capsys, tiny_dataset, "--segment-length", "6", "--segment-stride", "4")
    assert rc == 0, out + err
    n_frames = TINY_SYNTH["frames"]
    n_segments = len(split_segments(range(n_frames), 6, 4))
    assert f"{TINY_SYNTH['scenes']} scene(s)" in out
    cams = ", ".join(f"{c} {L.CAMERA_NAMES[c]} {TINY_SYNTH['width']}x{TINY_SYNTH['height']}"
                     for c in range(TINY_SYNTH["cameras"]))
    for name in ("000", "001", "002"):
        counts = [len(L.read_lidar(tiny_dataset / name / "lidar" / f"{t:03d}.bin")) for t in range(n_frames)]
        expected = (f"  scene {name}: {n_frames} frames, {n_segments} segment(s)\n"
                    f"    cameras: {cams}\n"
                    f"    lidar points: {min(counts)}/{np.mean(counts):.0f}/{max(counts)} (min/mean/max per frame)\n"
                    f"    optional: lidar, sky_masks, dynamic_masks, instances, depth, flow\n")
        assert expected in out
    assert out.rstrip().endswith("OK")
    assert err == ""


def test_single_scene_folder_and_quick_mode(capsys, tiny_dataset):
    rc, out, _ = run_inspect(capsys, tiny_dataset / "002", "--quick")
    assert rc == 0
    assert "1 scene(s)" in out and "scene 002:" in out


def test_minimal_scene_without_optional_modalities(capsys, data_with_broken_scene):
    import shutil

    root = data_with_broken_scene / BROKEN_SCENE
    for name in ("lidar", "sky_masks", "dynamic_masks", "instances", "depth", "flow"):
        shutil.rmtree(root / name)
    rc, out, _ = run_inspect(capsys, root)
    assert rc == 0
    assert "lidar points: none" in out and "optional: none" in out


# ----------------------------------------------------------------------------- bad inputs


def _write_text(rel: str, text: str) -> Callable[[Path], str]:
    def breaker(scene: Path) -> str:
        (scene / rel).write_text(text)
        return rel
    return breaker


def _truncate(rel: str, keep: Callable[[int], int]) -> Callable[[Path], str]:
    def breaker(scene: Path) -> str:
        data = (scene / rel).read_bytes()
        (scene / rel).write_bytes(data[: keep(len(data))])
        return rel
    return breaker


def _delete(rel: str) -> Callable[[Path], str]:
    def breaker(scene: Path) -> str:
        (scene / rel).unlink()
        return rel
    return breaker


def _lidar_nan(scene: Path) -> str:
    rel = "lidar/002.bin"
    pts = L.read_lidar(scene / rel)
    pts[5, 4] = np.nan
    L.write_lidar(scene / rel, pts)
    return rel


def _small_image(scene: Path) -> str:
    rel = "images/003_0.jpg"
    L.write_image(scene / rel, np.zeros((24, 32, 3), np.uint8))
    return rel


def _sky_mask_missing_in_one_frame(scene: Path) -> str:
    rel = "sky_masks/007_1.png"
    (scene / rel).unlink()
    return rel


SCALED_POSE = "1.1 0 0 5\n0 1.1 0 0\n0 0 1.1 0\n0 0 0 1\n"

BAD_INPUTS = {
    "missing ego pose": (_delete("ego_pose/005.txt"), r"missing file"),
    "truncated lidar": (_truncate("lidar/003.bin", lambda n: n - 20),
                        r"size \d+ bytes is not a multiple of 56 \(14 float32 columns\); the file is truncated"),
    "lidar NaN": (_lidar_nan, r"LiDAR origins or points contain NaN or Inf"),
    "truncated jpeg": (_truncate("images/004_1.jpg", lambda n: n // 2), r"unreadable image \(.*truncated"),
    "not a jpeg": (_write_text("images/004_2.jpg", "hello"), r"unreadable image \(cannot identify image file"),
    "non-finite pose": (_write_text("ego_pose/002.txt", "1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n"),
                        r"contains NaN or Inf"),
    "non-rigid pose": (_write_text("ego_pose/006.txt", SCALED_POSE), r"not a rigid transform"),
    "12-number extrinsic": (_write_text("extrinsics/1.txt", " ".join(["0"] * 12)),
                            r"expected a 4x4 matrix \(16 numbers\), found 12 numbers"),
    "text in intrinsics": (_write_text("intrinsics/0.txt", "fu fv"), r"not a list of numbers"),
    "8 intrinsics": (_write_text("intrinsics/2.txt", "50 50 32 24 0 0 0 0"), r"expected 9 numbers"),
    "negative focal": (_write_text("intrinsics/2.txt", "-50 50 32 24 0 0 0 0 0"), r"focal lengths must be positive"),
    "image size differs": (_small_image, r"image size 32x24 differs from (camera 0|its camera)'s 64x48"),
    "camera ids differ": (_delete("images/006_2.jpg"),
                          r"camera ids differ between frames: frame 0 has \[0, 1, 2\], frame 6 has \[0, 1\] "
                          r"\(every frame needs the same cameras\)"),
    "broken instances json": (_write_text("instances/instances_info.json", "{not json"), r"unreadable JSON"),
    "partial sky masks": (_sky_mask_missing_in_one_frame, r"missing file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_by_file_and_problem(capsys, data_with_broken_scene, case):
    breaker, problem = BAD_INPUTS[case]
    scene = data_with_broken_scene / BROKEN_SCENE
    rel = breaker(scene)
    # "camera ids differ" is reported on the images/ folder, everything else on the file itself.
    named = scene / "images" if case == "camera ids differ" else scene / rel
    rc, out, err = run_inspect(capsys, data_with_broken_scene)
    assert rc == 1, out
    assert "Traceback" not in out + err
    assert re.search(rf"    ERROR {re.escape(str(named))}: {problem}", out), out
    assert out.rstrip().endswith("INVALID: 1 problem(s)"), out
    # Scenes 000 and 002 are untouched and still summarised in full.
    assert "scene 000: 12 frames" in out and "scene 002: 12 frames" in out


@pytest.mark.parametrize("case", sorted(set(BAD_INPUTS) - {"broken instances json"}))
def test_loaders_refuse_the_same_bad_input(data_with_broken_scene, case):
    breaker, problem = BAD_INPUTS[case]
    scene = data_with_broken_scene / BROKEN_SCENE
    breaker(scene)
    with pytest.raises(L.DatasetError) as err:
        load_everything(scene)
    assert str(scene) in str(err.value)
    assert re.search(problem, str(err.value)), str(err.value)


def test_all_problems_are_listed_in_one_run(capsys, data_with_broken_scene):
    scene = data_with_broken_scene / BROKEN_SCENE
    broken = [BAD_INPUTS[c][0](scene) for c in ("missing ego pose", "truncated lidar", "non-rigid pose")]
    rc, out, _ = run_inspect(capsys, data_with_broken_scene)
    assert rc == 1
    for rel in broken:
        assert f"ERROR {scene / rel}: " in out
    assert "INVALID: 3 problem(s)" in out


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_no_dataset_exits_2_with_message(capsys, tmp_path, make):
    data = tmp_path / "nothing"
    if make == "empty":
        data.mkdir()
    rc, out, err = run_inspect(capsys, data)
    assert rc == 2 and out == ""
    expected = "data folder does not exist" if make == "missing" else "no scene folders found"
    assert err.startswith(f"error: {data}: {expected}")


def test_bad_setting_is_a_usage_error(capsys, tiny_dataset):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--data", str(tiny_dataset), "--segment-stride", "0"])
    assert exit_.value.code == 2
    assert "argument --segment-stride: must be >= 1, got 0" in capsys.readouterr().err
