"""Parse one Waymo Open Dataset v1 ``Frame`` record into numpy containers.

Frames and axes (Waymo conventions, kept as they are):

- camera extrinsics: camera-to-vehicle, **Waymo camera axes** (x forward, y left, z up);
- laser extrinsics: laser-to-vehicle;
- ``pose``: vehicle-to-world (Waymo's global ENU frame);
- laser label boxes: in the vehicle frame of this frame's ``pose``.

Camera and laser ids are Waymo's enum values (cameras 1 FRONT .. 5 SIDE_RIGHT, lasers 1 TOP ..
5 REAR); the drivestudio id is the Waymo id minus one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from evolsplat_ns.data.waymo.protos import waymo_frame_pb2 as pb

WAYMO_CAMERA_NAMES = {1: "FRONT", 2: "FRONT_LEFT", 3: "FRONT_RIGHT", 4: "SIDE_LEFT", 5: "SIDE_RIGHT"}
WAYMO_LASER_NAMES = {1: "TOP", 2: "FRONT", 3: "SIDE_LEFT", 4: "SIDE_RIGHT", 5: "REAR"}
LASER_TOP = 1
LABEL_CLASSES = {0: "unknown", 1: "Vehicle", 2: "Pedestrian", 3: "Sign", 4: "Cyclist"}


class FrameError(ValueError):
    """A record that is not a valid Waymo ``Frame`` (message names the source and record)."""


@dataclass
class CameraData:
    """One camera of one frame.

    Attributes:
        name: Waymo camera id (1 FRONT .. 5 SIDE_RIGHT).
        jpeg: the original JPEG bytes.
        intrinsics: [9] f_u f_v c_u c_v k1 k2 p1 p2 k3 (pixels of the full-resolution image).
        extrinsic: [4, 4] camera-to-vehicle, Waymo camera axes (x fwd, y left, z up).
        width, height: image size in pixels.
    """

    name: int
    jpeg: bytes
    intrinsics: np.ndarray
    extrinsic: np.ndarray
    width: int
    height: int


@dataclass
class LaserData:
    """First return of one laser of one frame.

    Attributes:
        name: Waymo laser id (1 TOP .. 5 REAR).
        range_image: [H, W, 4] float32: range (m), intensity, elongation, is_in_no_label_zone.
        extrinsic: [4, 4] laser-to-vehicle.
        inclinations: [H] float64 beam inclination (rad) of each row, row 0 = highest.
        pixel_pose: optional [H, W, 6] float32 roll pitch yaw x y z, vehicle-to-world pose of
            each pixel (TOP laser only).
        flow: optional [H, W, 4] float32 vx vy vz class (scene flow).
    """

    name: int
    range_image: np.ndarray
    extrinsic: np.ndarray
    inclinations: np.ndarray
    pixel_pose: np.ndarray | None = None
    flow: np.ndarray | None = None


@dataclass
class BoxLabel:
    """One 3D laser label (upright box) in the frame's vehicle frame.

    Attributes:
        object_id: Waymo's string id, stable across the frames of a segment.
        class_name: ``Vehicle``, ``Pedestrian``, ``Sign``, ``Cyclist`` or ``unknown``.
        center: [3] box centre (m), vehicle frame.
        size: [3] length (along heading), width, height (m).
        heading: yaw of the box x axis about vehicle z (rad).
        speed: horizontal speed |(speed_x, speed_y)| in m/s from the label metadata.
        num_lidar_points, num_top_lidar_points: LiDAR points inside the box (occlusion proxy).
    """

    object_id: str
    class_name: str
    center: np.ndarray
    size: np.ndarray
    heading: float
    speed: float
    num_lidar_points: int
    num_top_lidar_points: int


@dataclass
class FrameData:
    """Everything the converter needs from one frame.

    Attributes:
        segment: the segment (context) name.
        timestamp_micros: frame start time.
        pose: [4, 4] vehicle-to-world.
        cameras: Waymo camera id -> :class:`CameraData`.
        lasers: lasers that carry a first-return range image.
        labels: laser labels.
    """

    segment: str
    timestamp_micros: int
    pose: np.ndarray
    cameras: dict[int, CameraData] = field(default_factory=dict)
    lasers: list[LaserData] = field(default_factory=list)
    labels: list[BoxLabel] = field(default_factory=list)


def _matrix4(transform: pb.Transform, what: str) -> np.ndarray:
    vals = np.asarray(transform.transform, dtype=np.float64)
    if vals.size != 16:
        raise FrameError(f"{what}: expected a 4x4 transform (16 values), found {vals.size}")
    return vals.reshape(4, 4)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7


def _parse_matrix_float(buf: bytes) -> tuple[np.ndarray, tuple[int, ...]]:
    """(data, dims) of a serialized ``MatrixFloat``.

    Walks the wire format itself so the packed floats become one ``np.frombuffer``: the
    pure-Python protobuf runtime (what protobuf 3.20 gives on Python 3.11) needs ~1.4 s to turn
    a 64x2650x4 range image into a list, which made a 200-frame segment take ~20 minutes.
    """
    chunks: list[np.ndarray] = []
    dims: tuple[int, ...] = ()
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise DecodeError("truncated length-delimited field")
            if field_no == 1:
                chunks.append(np.frombuffer(buf, dtype="<f4", count=n // 4, offset=pos))
            elif field_no == 2:
                dims = tuple(pb.MatrixShape.FromString(buf[pos:pos + n]).dims)
            pos += n
        elif wire == 5:  # an unpacked float, or an unknown 32-bit field
            if field_no == 1:
                chunks.append(np.frombuffer(buf, dtype="<f4", count=1, offset=pos))
            pos += 4
        elif wire == 1:
            pos += 8
        elif wire == 0:
            _, pos = _varint(buf, pos)
        else:
            raise DecodeError(f"unsupported wire type {wire}")
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return data.astype(np.float32), dims


def decode_matrix_float(compressed: bytes, what: str) -> np.ndarray:
    """Inflate a zlib-compressed ``MatrixFloat`` into a float32 array of its ``shape.dims``."""
    try:
        data, dims = _parse_matrix_float(zlib.decompress(compressed))
    except (zlib.error, DecodeError) as e:
        raise FrameError(f"{what}: cannot decode the compressed MatrixFloat ({e})") from None
    if int(np.prod(dims)) != data.size:
        raise FrameError(f"{what}: shape {dims} does not match {data.size} values")
    return data.reshape(dims)


def uniform_inclinations(inclination_min: float, inclination_max: float, height: int) -> np.ndarray:
    """[height] ascending row-centre inclinations between min and max (Waymo's compute_inclination)."""
    return inclination_min + (np.arange(height) + 0.5) / height * (inclination_max - inclination_min)


def _row_inclinations(calib: pb.LaserCalibration, height: int, what: str) -> np.ndarray:
    """Per-row inclination, row 0 = highest (calibrations list them ascending, rows go top down)."""
    if len(calib.beam_inclinations):
        incl = np.asarray(calib.beam_inclinations, dtype=np.float64)
        if incl.size != height:
            raise FrameError(f"{what}: {incl.size} beam inclinations for a range image of {height} rows")
    else:
        incl = uniform_inclinations(calib.beam_inclination_min, calib.beam_inclination_max, height)
    return incl[::-1].copy()


def _parse_cameras(frame: pb.Frame, where: str) -> dict[int, CameraData]:
    calibs = {c.name: c for c in frame.context.camera_calibrations}
    cameras = {}
    for img in frame.images:
        if img.name not in WAYMO_CAMERA_NAMES:
            continue  # rear cameras of other Waymo datasets have no drivestudio id
        c = calibs.get(img.name)
        if c is None:
            raise FrameError(f"{where}: camera {WAYMO_CAMERA_NAMES[img.name]} has an image but no calibration")
        if len(c.intrinsic) != 9:
            raise FrameError(f"{where}: camera {img.name} has {len(c.intrinsic)} intrinsics, expected 9")
        cameras[img.name] = CameraData(
            name=img.name, jpeg=img.image, intrinsics=np.asarray(c.intrinsic, dtype=np.float64),
            extrinsic=_matrix4(c.extrinsic, f"{where}: camera {img.name} extrinsic"),
            width=c.width, height=c.height)
    return cameras


def _parse_lasers(frame: pb.Frame, where: str) -> list[LaserData]:
    calibs = {c.name: c for c in frame.context.laser_calibrations}
    lasers = []
    for laser in frame.lasers:
        ri = laser.ri_return1
        if not ri.range_image_compressed:
            continue
        what = f"{where}: laser {WAYMO_LASER_NAMES.get(laser.name, laser.name)}"
        if laser.name not in calibs:
            raise FrameError(f"{what}: range image without a laser calibration")
        image = decode_matrix_float(ri.range_image_compressed, f"{what} range image")
        if image.ndim != 3 or image.shape[2] < 3:
            raise FrameError(f"{what}: range image shape {image.shape}, expected [H, W, 4]")
        calib = calibs[laser.name]
        lasers.append(LaserData(
            name=laser.name, range_image=image,
            extrinsic=_matrix4(calib.extrinsic, f"{what} extrinsic"),
            inclinations=_row_inclinations(calib, image.shape[0], what),
            pixel_pose=(decode_matrix_float(ri.range_image_pose_compressed, f"{what} pixel pose")
                        if ri.range_image_pose_compressed else None),
            flow=(decode_matrix_float(ri.range_image_flow_compressed, f"{what} flow")
                  if ri.range_image_flow_compressed else None)))
    return lasers


def _parse_labels(frame: pb.Frame) -> list[BoxLabel]:
    return [
        BoxLabel(
            object_id=lab.id, class_name=LABEL_CLASSES.get(lab.type, "unknown"),
            center=np.array([lab.box.center_x, lab.box.center_y, lab.box.center_z]),
            size=np.array([lab.box.length, lab.box.width, lab.box.height]),
            heading=lab.box.heading,
            speed=float(np.hypot(lab.metadata.speed_x, lab.metadata.speed_y)),
            num_lidar_points=lab.num_lidar_points_in_box,
            num_top_lidar_points=lab.num_top_lidar_points_in_box)
        for lab in frame.laser_labels if lab.HasField("box")
    ]


def parse_frame(record: bytes, where: str = "record") -> FrameData:
    """Parse serialized ``Frame`` bytes; ``where`` (e.g. "file.tfrecord record 3") prefixes errors."""
    try:
        frame = pb.Frame.FromString(record)
    except DecodeError as e:
        raise FrameError(f"{where}: not a Waymo Frame protobuf ({e})") from None
    if not frame.HasField("pose"):
        raise FrameError(f"{where}: frame has no vehicle pose (is this a Waymo Open Dataset v1 Frame?)")
    return FrameData(
        segment=frame.context.name, timestamp_micros=frame.timestamp_micros,
        pose=_matrix4(frame.pose, f"{where}: frame pose"),
        cameras=_parse_cameras(frame, where), lasers=_parse_lasers(frame, where),
        labels=_parse_labels(frame))
