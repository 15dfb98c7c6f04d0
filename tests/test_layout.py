"""The drivestudio layout: readers and writers on hand-written files, scene indexing, and the
geometric consistency of a synthetic scene read through ``SceneData`` (OpenCV poses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.geometry import OPENCV2DATASET, invert_rigid, project_points

from conftest import TINY_SYNTH

# ----------------------------------------------------------------------------- readers and writers


def _pose(yaw: float, t=(1.0, -2.0, 0.5)) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0, t[0]], [s, c, 0, t[1]], [0, 0, 1, t[2]], [0, 0, 0, 1]])


def test_matrix_intrinsics_lidar_round_trip(tmp_path):
    T = _pose(0.3)
    L.write_matrix4(tmp_path / "m.txt", T)
    np.testing.assert_allclose(L.read_matrix4(tmp_path / "m.txt"), T, atol=1e-9)
    intr = np.array([500.0, 505.0, 320.0, 240.0, 0.01, -0.02, 0.0, 0.0, 0.001])
    L.write_intrinsics(tmp_path / "i.txt", intr)
    np.testing.assert_allclose(L.read_intrinsics(tmp_path / "i.txt"), intr)
    pts = np.random.default_rng(0).normal(size=(7, L.LIDAR_NUM_COLUMNS)).astype(np.float32)
    L.write_lidar(tmp_path / "l.bin", pts)
    assert (tmp_path / "l.bin").stat().st_size == 7 * L.LIDAR_POINT_BYTES == 7 * 56
    np.testing.assert_array_equal(L.read_lidar(tmp_path / "l.bin"), pts)


def test_matrix_reader_accepts_any_whitespace_and_checks_rigidity(tmp_path):
    (tmp_path / "m.txt").write_text("1 0 0 3\t0 1 0 4\n\n0 0 1 5 0 0 0 1")
    assert L.read_matrix4(tmp_path / "m.txt")[:3, 3].tolist() == [3, 4, 5]
    (tmp_path / "k.txt").write_text("2 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1")
    with pytest.raises(L.DatasetError, match=r"k.txt: not a rigid transform"):
        L.read_matrix4(tmp_path / "k.txt")
    assert L.read_matrix4(tmp_path / "k.txt", rigid=False)[0, 0] == 2  # e.g. a projection matrix


def test_image_and_mask_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    L.write_image(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(L.read_image(tmp_path / "a.png"), rgb)
    assert L.read_image_size(tmp_path / "a.png") == (16, 12)
    assert L.read_image(tmp_path / "a.png", size=(8, 6)).shape == (6, 8, 3)
    with pytest.raises(L.DatasetError, match=r"a.png: image size 16x12 differs from its camera's 8x6"):
        L.read_image(tmp_path / "a.png", expect_size=(8, 6))
    mask = np.zeros((12, 16), bool)
    mask[2:5, 3:9] = True
    L.write_mask(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(L.read_mask(tmp_path / "m.png"), mask)
    assert L.read_mask(tmp_path / "m.png", size=(8, 6)).shape == (6, 8)
    L.write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert L.read_json(tmp_path / "x.json") == {"a": [1, 2]}


def test_reader_errors_name_file_and_problem(tmp_path):
    with pytest.raises(L.DatasetError, match=r"nope.txt: missing file"):
        L.read_matrix4(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(L.DatasetError, match=r"bin.txt: not a list of numbers"):
        L.read_intrinsics(tmp_path / "bin.txt")
    (tmp_path / "short.bin").write_bytes(b"\0" * 60)
    with pytest.raises(L.DatasetError, match=r"short.bin: size 60 bytes is not a multiple of 56"):
        L.read_lidar(tmp_path / "short.bin")
    for reader in (L.read_image, L.read_mask):
        with pytest.raises(L.DatasetError, match=r"gone.png: missing file"):
            reader(tmp_path / "gone.png")
    err = L.DatasetError(tmp_path / "f", "is bad", "do this")
    assert str(err) == f"{tmp_path / 'f'}: is bad (do this)" and err.path == tmp_path / "f"


# ----------------------------------------------------------------------------- scene indexing


def _touch_images(root: Path, names: list[str]) -> None:
    for name in names:
        L.write_image(root / "images" / name, np.zeros((4, 4, 3), np.uint8))


def test_scan_indexes_frames_cameras_and_extensions(tmp_path):
    _touch_images(tmp_path, ["000_0.jpg", "000_1.png", "001_0.jpg", "001_1.png", "010_0.jpg", "010_1.png"])
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    lay = L.SceneLayout.scan(tmp_path)
    assert lay.frames == [0, 1, 10] and lay.cameras == [0, 1]
    assert lay.image_path(10, 1) == tmp_path / "images" / "010_1.png"
    assert lay.ego_pose_path(10) == tmp_path / "ego_pose" / "010.txt"
    assert lay.dynamic_mask_path(1, 0, "vehicle") == tmp_path / "dynamic_masks" / "vehicle" / "001_0.png"
    assert not any(lay.has(m) for m in ("lidar", "sky_masks", "dynamic_masks", "instances", "depth", "flow"))
    L.write_lidar(lay.lidar_path(0), np.zeros((1, 14)))
    assert lay.has("lidar")


def test_scan_errors(tmp_path):
    with pytest.raises(L.DatasetError, match=r"images: missing images/ folder \(a scene folder must hold"):
        L.SceneLayout.scan(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(L.DatasetError, match=r"images: no images named"):
        L.SceneLayout.scan(tmp_path)
    # Any rig: camera ids above 4 are cameras too (issue 12; they used to be refused), named
    # generically without a cameras.json.
    _touch_images(tmp_path, ["000_7.jpg"])
    lay = L.SceneLayout.scan(tmp_path)
    assert lay.cameras == [7] and lay.camera_names() == {7: "CAM_7"}
    L.write_json(tmp_path / "cameras.json", {"dataset": "nuscenz"})
    with pytest.raises(L.DatasetError, match=r"cameras.json: unknown dataset 'nuscenz' \(use one of"):
        L.SceneLayout.scan(tmp_path)


def test_find_scenes_sorts_numerically(tmp_path):
    for name in ("10", "2", "b", "a"):
        _touch_images(tmp_path / name, ["000_0.jpg"])
    (tmp_path / "no_images").mkdir()
    assert [p.name for p in L.find_scenes(tmp_path)] == ["2", "10", "a", "b"]
    assert L.find_scenes(tmp_path / "2") == [tmp_path / "2"]  # a scene folder is its own dataset


# ----------------------------------------------------------------------------- synthetic scene geometry


def test_scene_calibration_matches_files(tiny_dataset):
    scene = SceneData(tiny_dataset / "000")
    assert scene.frames == list(range(TINY_SYNTH["frames"])) and scene.cameras == [0, 1, 2]
    for cam in scene.cameras:
        intr = L.read_intrinsics(scene.layout.intrinsics_path(cam))
        ext = L.read_matrix4(scene.layout.extrinsics_path(cam))
        calib = scene.calib[cam]
        np.testing.assert_allclose(calib.K, [[intr[0], 0, intr[2]], [0, intr[1], intr[3]], [0, 0, 1]])
        np.testing.assert_allclose(calib.cam_to_vehicle, ext @ OPENCV2DATASET)
        # OpenCV +z (looking direction) is the Waymo camera's +x (forward).
        np.testing.assert_allclose(calib.cam_to_vehicle[:3, 2], ext[:3, 0])
        assert (calib.width, calib.height) == calib.full_size == (TINY_SYNTH["width"], TINY_SYNTH["height"])


@pytest.mark.parametrize("scene_name, downscale", [("000", 1.0), ("002", 1.0), ("001", 2.0)])
def test_lidar_projects_onto_synthetic_depth(tiny_dataset, scene_name, downscale):
    """LiDAR points (vehicle frame) moved to the world by ego_pose and projected into each camera with
    SceneData's OpenCV camera-to-world (and downscaled intrinsics) land where the rendered z-depth
    says, for most points (the rest are seen by the roof LiDAR but hidden from the lower camera)."""
    scene = SceneData(tiny_dataset / scene_name, downscale=downscale)
    for t in (0, TINY_SYNTH["frames"] - 1):
        raw = L.read_lidar(scene.layout.lidar_path(t))
        world = scene.load_lidar([t], np.eye(4)).points.double()
        np.testing.assert_allclose(world.numpy(), raw[:, 3:6] @ scene.ego_to_world[t][:3, :3].T
                                   + scene.ego_to_world[t][:3, 3], rtol=1e-6, atol=1e-3)
        views = scene.load_views([t], np.eye(4), depth=True, sky=True)
        uv, z = project_points(world, views.intrinsics.double(), invert_rigid(views.camtoworlds.double()))
        for c in range(len(views)):
            ix, iy = uv[c, :, 0].floor().long(), uv[c, :, 1].floor().long()
            inside = (z[c] > 0) & (ix >= 0) & (ix < views.width) & (iy >= 0) & (iy < views.height)
            assert inside.sum() > 200 / downscale, f"camera {c} sees too few LiDAR points"
            gt = views.depths[c][iy[inside], ix[inside]].double()
            # Downscaled depth maps are nearest-resized: on the steep ground of a 32x24 image each
            # pixel spans more depth, hence the looser bounds.
            agree = ((z[c][inside] - gt).abs() < 0.05 * downscale * gt).double().mean()
            assert agree > (0.85 if downscale == 1 else 0.8), f"frame {t} camera {c}: only {agree:.0%} of LiDAR points match the depth map"
            assert not views.sky_masks[c][iy[inside], ix[inside]].any()  # LiDAR never hits the sky


def test_camera_names_any_rig(tmp_path):
    """cameras.json names cameras (known rigs by dataset, explicit names win); else Waymo or CAM_i."""
    _touch_images(tmp_path, [f"000_{c}.jpg" for c in range(8)])
    assert L.SceneLayout.scan(tmp_path).camera_names()[7] == "CAM_7"
    _touch_images(tmp_path / "w", [f"000_{c}.jpg" for c in range(3)])
    assert L.SceneLayout.scan(tmp_path / "w").camera_names() == {0: "FRONT", 1: "FRONT_LEFT", 2: "FRONT_RIGHT"}
    L.write_json(tmp_path / "cameras.json", {"dataset": "nuplan", "names": {"7": "REAR"}})
    names = L.SceneLayout.scan(tmp_path).camera_names()
    assert names[0] == "CAM_F0" and names[6] == "CAM_R2" and names[7] == "REAR"
    for rig, n in (("waymo", 5), ("nuscenes", 6), ("pandaset", 6), ("argoverse2", 7), ("kitti", 2), ("nuplan", 8)):
        assert len(L.CAMERA_RIGS[rig]) == n
    L.write_json(tmp_path / "cameras.json", {"names": {"front": "X"}})
    with pytest.raises(L.DatasetError, match=r"cameras.json: 'names' must map camera ids"):
        L.SceneLayout.scan(tmp_path)


def test_normalised_intensity():
    pts = np.zeros((3, L.LIDAR_NUM_COLUMNS), np.float32)
    pts[:, 11] = [0.0, 0.5, 1.0]
    assert np.allclose(L.normalised_intensity(pts), [0, 0.5, 1])
    pts[:, 11] = [0.0, 127.5, 255.0]
    assert np.allclose(L.normalised_intensity(pts), [0, 0.5, 1])
    pts[:, 11] = [np.nan, -1, 300]
    assert np.allclose(L.normalised_intensity(pts), [0, 0, 1])
