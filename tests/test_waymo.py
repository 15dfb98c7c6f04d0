"""Raw Waymo TFRecord -> drivestudio layout: framing, CRCs, range images, boxes, conversion, resume."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from evolsplat_ns.cli.process_waymo import entrypoint
from evolsplat_ns.data import layout
from evolsplat_ns.data.inspect import inspect_dataset
from evolsplat_ns.data.waymo import tfrecord
from evolsplat_ns.data.waymo.boxes import MASK_GROUPS, dynamic_mask
from evolsplat_ns.data.waymo.convert import DONE_MARKER, SCENE_MAP, plan_jobs, run_jobs
from evolsplat_ns.data.waymo.frame import (
    BoxLabel, CameraData, FrameError, decode_matrix_float, parse_frame, uniform_inclinations,
)
from evolsplat_ns.data.waymo.protos import waymo_frame_pb2 as pb
from evolsplat_ns.data.waymo.range_image import points_from_range_image

REAL_RECORD = Path(os.environ.get(
    "EVOLSPLAT_WAYMO_RECORD",
    Path(__file__).resolve().parents[2] / "shared/data/waymo/pvps_data_one_frame.tfrecord"))
needs_real_record = pytest.mark.skipif(
    not REAL_RECORD.is_file(),
    reason=f"real Waymo record not found at {REAL_RECORD} (set EVOLSPLAT_WAYMO_RECORD to its path)")


# ----------------------------------------------------------------------------- synthetic input


def _jpeg(w: int = 16, h: int = 12, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _yaw_transform(yaw: float, t: tuple[float, float, float]) -> np.ndarray:
    T = np.eye(4)
    T[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    T[:3, 3] = t
    return T


def _matrix_float(a: np.ndarray) -> bytes:
    msg = pb.MatrixFloat(data=a.astype(np.float32).ravel().tolist())
    msg.shape.dims.extend(a.shape)
    return zlib.compress(msg.SerializeToString())


def _wall_range_image(H: int, W: int, incl_top_down: np.ndarray, origin: np.ndarray, wall_x: float):
    """Ray-cast a wall x = wall_x (vehicle frame) from ``origin``.

    Uses the vehicle-frame statement of Waymo's convention, independent of the laser yaw:
    column c looks along azimuth pi - (c + 0.5) * 2pi / W. Returns ranges [H, W] and points.
    """
    az = np.pi - (np.arange(W) + 0.5) * 2 * np.pi / W
    d = np.stack(np.broadcast_arrays(np.cos(az)[None] * np.cos(incl_top_down)[:, None],
                                     np.sin(az)[None] * np.cos(incl_top_down)[:, None],
                                     np.sin(incl_top_down)[:, None]), axis=-1)
    with np.errstate(divide="ignore"):
        r = np.where(d[..., 0] > 0.05, (wall_x - origin[0]) / d[..., 0], 0.0)
    return r, origin + d * r[..., None]


def _synthetic_frame(t: int, with_laser: bool = True, speed: float = 2.0) -> bytes:
    """A Frame with one 16x12 FRONT camera looking along vehicle +x, a laser and one moving car."""
    f = pb.Frame(timestamp_micros=1000 + t)
    f.context.name = "synthetic_segment"
    f.pose.transform.extend(_yaw_transform(0.1, (100.0 + t, 50.0, 3.0)).ravel())
    cam = f.context.camera_calibrations.add(name=1, width=16, height=12)
    cam.intrinsic.extend([10.0, 10.0, 8.0, 6.0, 0, 0, 0, 0, 0])
    cam.extrinsic.transform.extend(np.eye(4).ravel())
    f.images.add(name=1, image=_jpeg(seed=t))
    if with_laser:
        ext = _yaw_transform(0.5, (1.0, 0.0, 2.0))
        lc = f.context.laser_calibrations.add(name=1, beam_inclination_min=-0.3, beam_inclination_max=0.1)
        lc.extrinsic.transform.extend(ext.ravel())
        incl = uniform_inclinations(-0.3, 0.1, 4)[::-1]
        r, _ = _wall_range_image(4, 32, incl, ext[:3, 3], 10.0)
        ri = np.stack([r, np.full_like(r, 0.5), np.full_like(r, 0.1), np.zeros_like(r)], axis=-1)
        f.lasers.add(name=1).ri_return1.range_image_compressed = _matrix_float(ri)
    lab = f.laser_labels.add(type=1, id="car-a", num_lidar_points_in_box=10)
    lab.box.center_x, lab.box.length, lab.box.width, lab.box.height = 10.0, 2.0, 2.0, 2.0
    lab.metadata.speed_x = speed
    return f.SerializeToString()


@pytest.fixture
def segments(tmp_path: Path) -> list[Path]:
    """Two synthetic segment files of 2 frames each."""
    paths = []
    for i, name in enumerate(["b_seg.tfrecord", "a_seg.tfrecord"]):
        p = tmp_path / "raw" / name
        p.parent.mkdir(exist_ok=True)
        tfrecord.write_records(p, [_synthetic_frame(t, speed=2.0 + i) for t in range(2)])
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- framing


def test_crc32c_known_value_and_implementations_agree():
    assert tfrecord.crc32c_python(b"123456789") == 0xE3069283
    data = np.random.default_rng(0).bytes(5000)
    assert tfrecord.crc32c(data) == tfrecord.crc32c_python(data)


def test_corrupt_record_names_file_and_record(tmp_path: Path):
    path = tmp_path / "seg.tfrecord"
    tfrecord.write_records(path, [b"first record", b"second record"])
    raw = bytearray(path.read_bytes())
    assert [bytes(r) for r in tfrecord.read_records(path)] == [b"first record", b"second record"]
    raw[-8] ^= 0xFF  # a payload byte of record 1
    path.write_bytes(bytes(raw))
    with pytest.raises(tfrecord.TFRecordError, match=r"seg\.tfrecord: record 1: data CRC mismatch"):
        list(tfrecord.read_records(path))
    raw[-8] ^= 0xFF
    raw[len(b"first record") + 16 + 2] ^= 0x01  # a length byte of record 1
    path.write_bytes(bytes(raw))
    with pytest.raises(tfrecord.TFRecordError, match=r"seg\.tfrecord: record 1: length CRC mismatch"):
        list(tfrecord.read_records(path))


def test_truncated_file_names_file_and_record(tmp_path: Path):
    path = tmp_path / "seg.tfrecord"
    tfrecord.write_records(path, [b"a" * 100, b"b" * 100])
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(tfrecord.TFRecordError, match=r"seg\.tfrecord: record 1: truncated"):
        list(tfrecord.read_records(path))


# ----------------------------------------------------------------------------- range images


def test_matrix_float_decodes_packed_and_unpacked_encodings():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    np.testing.assert_array_equal(decode_matrix_float(_matrix_float(a), "packed"), a)
    shape = pb.MatrixShape(dims=[2, 2]).SerializeToString()
    unpacked = b"".join(b"\x0d" + np.float32(v).tobytes() for v in (1.5, 2.5, 3.5, 4.5))
    unpacked += b"\x12" + bytes([len(shape)]) + shape
    np.testing.assert_array_equal(decode_matrix_float(zlib.compress(unpacked), "unpacked"),
                                  [[1.5, 2.5], [3.5, 4.5]])
    with pytest.raises(FrameError, match="broken: cannot decode"):
        decode_matrix_float(b"not zlib", "broken")


@pytest.mark.parametrize("yaw", [0.0, 0.7, -2.5])
def test_range_image_wall_lands_where_built(yaw: float):
    ext = _yaw_transform(yaw, (1.5, -0.4, 2.1))
    incl = np.linspace(0.2, -0.4, 6)  # row 0 highest
    ranges, expected = _wall_range_image(6, 40, incl, ext[:3, 3], 12.0)
    origins, points = points_from_range_image(ranges, ext, incl)
    hit = ranges > 0
    assert 0 < hit.sum() < hit.size
    np.testing.assert_allclose(points[hit], expected[hit], atol=1e-9)
    np.testing.assert_allclose(points[hit][:, 0], 12.0, atol=1e-9)
    np.testing.assert_allclose(origins[hit], np.broadcast_to(ext[:3, 3], (hit.sum(), 3)))


def test_pixel_pose_moves_points_into_the_frame_vehicle_frame():
    ext, incl = np.eye(4), np.array([0.0])
    ranges = np.full((1, 8), 5.0)
    frame_pose = _yaw_transform(0.3, (10.0, 20.0, 1.0))
    _, ref = points_from_range_image(ranges, ext, incl)
    # pixel fired when the vehicle was 1 m further along world x than at the frame pose
    rpy_xyz = np.broadcast_to([0.0, 0.0, 0.3, 11.0, 20.0, 1.0], (1, 8, 6))
    _, moved = points_from_range_image(ranges, ext, incl, rpy_xyz, frame_pose)
    shift = frame_pose[:3, :3].T @ np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(moved, ref + shift, atol=1e-9)


# ----------------------------------------------------------------------------- boxes


def test_dynamic_mask_covers_moving_box_only():
    cam = CameraData(1, b"", np.array([10.0, 10, 8, 6, 0, 0, 0, 0, 0]), np.eye(4), 16, 12)

    def car(speed: float) -> BoxLabel:
        return BoxLabel("x", "Vehicle", np.array([10.0, 0, 0]), np.array([2.0, 2, 2]), 0.0, speed, 5, 0)

    moving = dynamic_mask([car(2.0)], cam, MASK_GROUPS["all"])
    assert moving[6, 8] and not moving[0, 0] and moving.sum() < moving.size / 2
    assert not dynamic_mask([car(0.5)], cam, MASK_GROUPS["all"]).any()
    assert not dynamic_mask([car(2.0)], cam, MASK_GROUPS["human"]).any()


# ----------------------------------------------------------------------------- conversion


def test_synthetic_segment_converts_to_layout(segments: list[Path], tmp_path: Path):
    out = tmp_path / "processed"
    [res] = run_jobs(plan_jobs([segments[0]], out))
    assert res.status == "converted" and res.frames == 2, res.message
    report = inspect_dataset(out)
    assert report.ok and report.scenes[0].lidar_points is not None, report.format()
    scene = layout.SceneLayout.scan(out / "000")
    assert scene.frames == [0, 1] and scene.cameras == [0] and scene.has("lidar")
    pts = layout.read_lidar(scene.lidar_path(1))
    assert len(pts) == res.lidar_points // 2 > 0
    np.testing.assert_allclose(pts[:, 3], 10.0, atol=1e-4)  # the wall, in the vehicle frame
    np.testing.assert_allclose(pts[:, 0:3], np.broadcast_to([1.0, 0.0, 2.0], (len(pts), 3)), atol=1e-6)
    assert np.all(pts[:, 6:11] == 0) and np.allclose(pts[:, 11:13], [0.5, 0.1]) and np.all(pts[:, 13] == 0)
    assert layout.read_mask(scene.dynamic_mask_path(0, 0, "vehicle"))[6, 8]
    assert not layout.read_mask(scene.dynamic_mask_path(0, 0, "human")).any()
    info = layout.read_json(scene.instances_info_path)
    assert layout.read_json(scene.frame_instances_path) == {"0": [0], "1": [0]}
    ann = info["0"]["frame_annotations"]
    assert info["0"]["class_name"] == "Vehicle" and ann["frame_idx"] == [0, 1]
    np.testing.assert_allclose(np.array(ann["obj_to_world"][1])[:3, 3],
                               _yaw_transform(0.1, (101.0, 50.0, 3.0))[:3, :3] @ [10, 0, 0] + [101, 50, 3])


def test_resume_skips_refuses_and_overwrites(segments: list[Path], tmp_path: Path, capsys):
    out = tmp_path / "processed"
    argv = ["--source", str(segments[0].parent), "--out", str(out)]
    assert entrypoint(argv + ["--scenes", "1"]) == 0
    assert entrypoint(argv + ["--scenes", "0"]) == 0
    scene_map = layout.read_json(out / SCENE_MAP)
    # sorted by file name: a_seg -> 000, b_seg -> 001; the second run kept the first's entry
    assert {k: v["source"] for k, v in scene_map.items()} == {"000": "a_seg.tfrecord", "001": "b_seg.tfrecord"}
    jpeg = out / "000/images/000_0.jpg"
    mtime = jpeg.stat().st_mtime_ns
    assert entrypoint(argv + ["--workers", "2"]) == 0
    assert "already complete" in capsys.readouterr().out and jpeg.stat().st_mtime_ns == mtime
    (out / "001" / DONE_MARKER).unlink()  # as if interrupted
    assert entrypoint(argv) == 1
    assert "incomplete" in capsys.readouterr().out and not (out / "001" / DONE_MARKER).exists()
    assert entrypoint(argv + ["--scenes", "1", "--overwrite"]) == 0
    assert "replacing incomplete scene" in capsys.readouterr().out
    assert (out / "001" / DONE_MARKER).is_file()


def test_parallel_workers_convert_every_segment(segments: list[Path], tmp_path: Path):
    results = run_jobs(plan_jobs(segments, tmp_path / "processed"), workers=2)
    assert [(r.scene, r.status, r.frames) for r in results] == [("000", "converted", 2), ("001", "converted", 2)]
    assert len(layout.find_scenes(tmp_path / "processed")) == 2


def test_bad_scene_index_is_an_error(segments: list[Path], tmp_path: Path, capsys):
    assert entrypoint(["--source", *map(str, segments), "--out", str(tmp_path / "o"), "--scenes", "5"]) == 2
    assert "out of range" in capsys.readouterr().err


@needs_real_record
def test_real_record_converts_exactly(tmp_path: Path):
    out = tmp_path / "processed" / "training"
    [res] = run_jobs(plan_jobs([REAL_RECORD], out))
    assert res.status == "converted", res.message
    frame = pb.Frame.FromString(next(tfrecord.read_records(REAL_RECORD)))
    parse_frame(frame.SerializeToString())  # the numpy view parses too
    scene = layout.SceneLayout.scan(out / "000")
    assert scene.frames == [0] and scene.cameras == [0, 1, 2, 3, 4]
    for calib in frame.context.camera_calibrations:
        c = calib.name - 1
        np.testing.assert_allclose(layout.read_intrinsics(scene.intrinsics_path(c)), calib.intrinsic, rtol=1e-9)
        np.testing.assert_allclose(layout.read_matrix4(scene.extrinsics_path(c)),
                                   np.reshape(calib.extrinsic.transform, (4, 4)), rtol=1e-9, atol=1e-12)
    for image in frame.images:
        assert scene.image_path(0, image.name - 1).read_bytes() == image.image
        calib = next(c for c in frame.context.camera_calibrations if c.name == image.name)
        assert layout.read_image_size(scene.image_path(0, image.name - 1)) == (calib.width, calib.height)
        assert layout.read_mask(scene.dynamic_mask_path(0, image.name - 1)).shape == (calib.height, calib.width)
    np.testing.assert_allclose(layout.read_matrix4(scene.ego_pose_path(0)),
                               np.reshape(frame.pose.transform, (4, 4)), rtol=1e-9, atol=1e-6)
    assert not scene.has("lidar")  # this record carries no range images
    info = layout.read_json(scene.instances_info_path)
    assert info and {v["class_name"] for v in info.values()} <= {"Vehicle", "Pedestrian", "Cyclist"}
    assert sorted(layout.read_json(scene.frame_instances_path)["0"]) == sorted(int(k) for k in info)
    report = inspect_dataset(out)
    assert report.ok, report.format()
