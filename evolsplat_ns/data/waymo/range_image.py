"""Waymo range images -> LiDAR points in the vehicle frame (numpy; matches the Waymo devkit).

Geometry, as in the devkit's ``range_image_utils.compute_range_image_polar`` /
``compute_range_image_cartesian`` and ``frame_utils.convert_range_image_to_cartesian``:

- row ``i`` has inclination ``inclinations[i]`` (row 0 = highest beam);
- column ``c`` of ``W`` has, in the **laser frame**,
  ``azimuth = pi - (c + 0.5) * 2pi / W - yaw``, with ``yaw = atan2(E[1,0], E[0,0])`` of the laser
  extrinsic ``E``. After rotating by ``E`` the yaw cancels, so in the vehicle frame column 0 looks
  backwards (azimuth ~ +pi) and the columns sweep clockwise seen from above;
- laser-frame point ``r * (cos az cos incl, sin az cos incl, sin incl)``, then ``E`` maps it to
  the vehicle frame;
- where a per-pixel pose is given (the TOP laser's ``range_image_pose_compressed``: roll, pitch,
  yaw, x, y, z of the vehicle-to-world pose at the time each pixel was fired), points go through
  that pose to the world and back through the inverse frame pose, which removes the ego-motion
  smear of the 100 ms sweep. This converter applies it (``points_from_range_image`` with
  ``pixel_pose``), to points and sensor origins alike.

Pixels with range <= 0 are returns that did not come back and are dropped.
"""

from __future__ import annotations

import numpy as np

from evolsplat_ns.data.layout import LIDAR_NUM_COLUMNS
from evolsplat_ns.data.waymo.frame import FrameData, LaserData


def rotation_from_rpy(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] = Rz(yaw) @ Ry(pitch) @ Rx(roll) (Waymo's 3-2-1 Euler angles)."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    R = np.empty(np.shape(roll) + (3, 3), dtype=np.float64)
    R[..., 0, 0] = cy * cp
    R[..., 0, 1] = cy * sp * sr - sy * cr
    R[..., 0, 2] = cy * sp * cr + sy * sr
    R[..., 1, 0] = sy * cp
    R[..., 1, 1] = sy * sp * sr + cy * cr
    R[..., 1, 2] = sy * sp * cr - cy * sr
    R[..., 2, 0] = -sp
    R[..., 2, 1] = cp * sr
    R[..., 2, 2] = cp * cr
    return R


def column_azimuths(width: int, extrinsic: np.ndarray) -> np.ndarray:
    """[W] azimuth (rad) of each range-image column in the laser frame."""
    yaw = np.arctan2(extrinsic[1, 0], extrinsic[0, 0])
    return np.pi - (np.arange(width) + 0.5) * (2.0 * np.pi / width) - yaw


def _apply_pixel_pose(xyz: np.ndarray, pixel_pose: np.ndarray, frame_pose: np.ndarray) -> np.ndarray:
    """Vehicle-at-pixel-time points [H, W, 3] -> vehicle frame of ``frame_pose``, via the world."""
    R = rotation_from_rpy(pixel_pose[..., 0], pixel_pose[..., 1], pixel_pose[..., 2])
    world = np.einsum("hwij,hwj->hwi", R, xyz) + pixel_pose[..., 3:6]
    world_to_vehicle = np.linalg.inv(frame_pose)
    return world @ world_to_vehicle[:3, :3].T + world_to_vehicle[:3, 3]


def points_from_range_image(
    ranges: np.ndarray,
    extrinsic: np.ndarray,
    inclinations: np.ndarray,
    pixel_pose: np.ndarray | None = None,
    frame_pose: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cartesian points and sensor origins of every range-image pixel, in the vehicle frame.

    Args:
        ranges: [H, W] range in metres (<= 0: no return).
        extrinsic: [4, 4] laser-to-vehicle.
        inclinations: [H] beam inclination (rad) per row, row 0 = highest.
        pixel_pose: optional [H, W, 6] roll pitch yaw x y z, vehicle-to-world pose per pixel.
        frame_pose: [4, 4] vehicle-to-world of the frame; required with ``pixel_pose``.
    Returns:
        origins [H, W, 3] and points [H, W, 3], float64, vehicle frame of ``frame_pose``.
    """
    H, W = ranges.shape
    if inclinations.shape != (H,):
        raise ValueError(f"inclinations has shape {inclinations.shape}, expected ({H},) for a {H}x{W} range image")
    az = column_azimuths(W, extrinsic)[None, :]
    incl = inclinations[:, None]
    r = ranges.astype(np.float64)
    local = np.stack([np.cos(az) * np.cos(incl) * r, np.sin(az) * np.cos(incl) * r,
                      np.broadcast_to(np.sin(incl) * r, (H, W))], axis=-1)
    points = local @ extrinsic[:3, :3].T + extrinsic[:3, 3]
    origins = np.broadcast_to(extrinsic[:3, 3], (H, W, 3))
    if pixel_pose is not None:
        if frame_pose is None:
            raise ValueError("frame_pose is required when pixel_pose is given")
        if pixel_pose.shape[:2] != (H, W):
            raise ValueError(f"pixel pose {pixel_pose.shape} does not match the {H}x{W} range image")
        points = _apply_pixel_pose(points, pixel_pose, frame_pose)
        origins = _apply_pixel_pose(origins, pixel_pose, frame_pose)
    return np.ascontiguousarray(origins), points


def laser_point_table(laser: LaserData, frame_pose: np.ndarray) -> np.ndarray:
    """drivestudio LiDAR rows [N, 14] (``layout.LIDAR_COLUMNS``) of one laser's first return.

    Points and origins are in the vehicle frame of ``frame_pose`` [4, 4] (vehicle-to-world), which
    only matters when the laser carries a per-pixel pose (the TOP laser). Ground is 0 (unknown);
    flow columns are the range image's scene flow, or 0 without one.
    """
    ri = laser.range_image
    valid = ri[..., 0] > 0
    origins, points = points_from_range_image(ri[..., 0], laser.extrinsic, laser.inclinations,
                                              laser.pixel_pose, frame_pose)
    out = np.zeros((int(valid.sum()), LIDAR_NUM_COLUMNS), dtype=np.float32)
    out[:, 0:3] = origins[valid]
    out[:, 3:6] = points[valid]
    if laser.flow is not None:
        out[:, 6:10] = laser.flow[valid][:, :4]
    out[:, 11] = ri[..., 1][valid]
    out[:, 12] = ri[..., 2][valid]
    out[:, 13] = laser.name - 1
    return out


def frame_point_table(frame: FrameData) -> np.ndarray:
    """All lasers' first-return points of a frame, [N, 14] float32 in the vehicle frame."""
    tables = [laser_point_table(laser, frame.pose)
              for laser in sorted(frame.lasers, key=lambda l: l.name)]
    if not tables:
        return np.zeros((0, LIDAR_NUM_COLUMNS), dtype=np.float32)
    return np.concatenate(tables, axis=0)
