"""Turning ray hits into sensor data: shaded images, depth, optical flow, masks and LiDAR rows.

Shading is view-independent on purpose (novel-view synthesis must be able to learn it):
colour = albedo * (hemispherical ambient + Lambert sun term * shadow), with one fixed sun per
street. Only static geometry casts shadows, so the static scene looks the same in every frame.
The sky is a gradient by ray elevation (street-frame z of the unit ray direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evolsplat_ns.data.layout import LIDAR_NUM_COLUMNS
from evolsplat_ns.data.synth.sensors import LIDAR_MOUNT, TOP_LIDAR_ID, CameraRig, Hits, Raycaster
from evolsplat_ns.data.synth.street import Street
from evolsplat_ns.data.synth.textures import GROUND_MATERIALS, Surface, albedo

SKY_HORIZON = np.array([0.80, 0.86, 0.93], np.float32)
SKY_ZENITH = np.array([0.28, 0.48, 0.80], np.float32)
AMBIENT = 0.40
SUN_LIGHT = np.array([0.78, 0.74, 0.66], np.float32)
SHADOW_OFFSET = 0.02  # metres along the normal, keeps shadow rays off their own surface
WAYMO_VEHICLE_FLOW_CLASS = 1  # Waymo scene-flow class of points inside vehicle boxes (0 = background)


def sky_colour(directions: np.ndarray) -> np.ndarray:
    """Sky RGB [N, 3] in [0, 1] for ray ``directions`` [N, 3] (street frame, any length)."""
    up = directions[:, 2] / np.linalg.norm(directions, axis=1)
    w = np.sqrt(np.clip(up, 0, 1))[:, None]
    return SKY_HORIZON * (1 - w) + SKY_ZENITH * w


def hit_surfaces(hits: Hits, car_poses: np.ndarray) -> Surface:
    """Texture inputs of ``hits``: car hits in their car's local frame, the rest in the street frame.

    ``car_poses`` [K, 4, 4] are car-local -> street at the hits' time.
    """
    to_local = np.linalg.inv(car_poses) if len(car_poses) else car_poses
    pos = _per_car_transform(hits.point, hits.car, to_local)
    normal = _per_car_transform(hits.normal, hits.car, to_local, rotate_only=True)
    return Surface(pos, normal, hits.colour, hits.params)


def _per_car_transform(x: np.ndarray, car: np.ndarray, T: np.ndarray, rotate_only: bool = False) -> np.ndarray:
    """Map rows of ``x`` [M, 3] with ``car`` [M] >= 0 by their car's ``T`` [K, 4, 4]; others unchanged."""
    out = x.copy()
    sel = np.flatnonzero(car >= 0)
    Tk = T[car[sel]].astype(x.dtype)
    out[sel] = np.sum(Tk[:, :3, :3] * x[sel, None, :], axis=2)
    if not rotate_only:
        out[sel] += Tk[:, :3, 3]
    return out


def shade(street: Street, caster: Raycaster, hits: Hits, albedos: np.ndarray, shadows: bool) -> np.ndarray:
    """Lit colour [M, 3] in [0, 1] of the hits with ``albedos`` [M, 3]."""
    n_dot_l = np.clip(hits.normal @ street.sun, 0, None)
    if shadows:
        facing = np.flatnonzero(n_dot_l > 0)
        origins = hits.point[facing] + SHADOW_OFFSET * hits.normal[facing]
        rays = np.concatenate([origins, np.broadcast_to(street.sun, origins.shape)], 1)
        n_dot_l[facing[caster.occluded_static(rays)]] = 0
    ambient = AMBIENT * (0.8 + 0.2 * hits.normal[:, 2])  # open sky above is brighter than the ground
    return np.clip(albedos * (ambient[:, None] + n_dot_l[:, None] * SUN_LIGHT), 0, 1)


@dataclass
class CameraFrame:
    """Everything the C cameras record at one frame.

    Attributes:
        rgb: [C, H, W, 3] uint8.
        depth: [C, H, W] float32 OpenCV z-depth in metres, 0 for sky.
        flow: [C, H, W, 2] float16 pixel displacement (dx right, dy down) of each pixel's surface
            point from this frame to the next, same camera; zeros when there is no next frame.
        sky: [C, H, W] bool, True where the ray hit nothing.
        dynamic: [C, H, W] bool, True on moving cars.
        instance: [C, H, W] int32, 0 where no car was hit, else car index + 1 (the instance id of
            ``instances_info.json`` + 1), parked cars included.
    """

    rgb: np.ndarray
    depth: np.ndarray
    flow: np.ndarray
    sky: np.ndarray
    dynamic: np.ndarray
    instance: np.ndarray


def render_cameras(street: Street, rig: CameraRig, caster: Raycaster, time: float,
                   next_time: float | None, shadows: bool) -> CameraFrame:
    """Render all cameras at ``time`` in one ray cast; ``caster`` must be set to ``time``.

    ``next_time`` is the time of the next frame for optical flow (None on the last frame).
    """
    C, H, W = rig.num_cameras, rig.height, rig.width
    rays = rig.rays(street.ego.pose(time)).reshape(-1, 6)
    hits = caster.cast(rays)
    poses = street.car_poses(time)
    hit = np.isfinite(hits.t)
    rgb = np.empty((len(rays), 3), np.float32)
    rgb[~hit] = sky_colour(rays[~hit, 3:])
    surf_albedo = albedo(hits.material, hit_surfaces(hits, poses), street.noise)
    rgb[hits.index] = shade(street, caster, hits, surf_albedo, shadows)
    moving = np.array([c.moving for c in street.cars] + [False], bool)  # index -1 -> not a car
    dynamic = np.zeros(len(rays), bool)
    dynamic[hits.index] = moving[hits.car]
    instance = np.zeros(len(rays), np.int32)
    instance[hits.index] = hits.car + 1  # car -1 (not a car) -> 0
    if next_time is None:
        flow = np.zeros((len(rays), 2), np.float32)
    else:
        flow = _camera_flow(street, rig, rays, hits, poses, next_time)
    return CameraFrame(
        rgb=np.round(rgb * 255).astype(np.uint8).reshape(C, H, W, 3),
        depth=np.where(hit, hits.t, 0).astype(np.float32).reshape(C, H, W),
        flow=flow.astype(np.float16).reshape(C, H, W, 2),
        sky=~hit.reshape(C, H, W),
        dynamic=dynamic.reshape(C, H, W),
        instance=instance.reshape(C, H, W),
    )


def _camera_flow(street: Street, rig: CameraRig, rays: np.ndarray, hits: Hits, poses: np.ndarray,
                 next_time: float) -> np.ndarray:
    """[C * H * W, 2] pixel motion to ``next_time``: surface points move with their car (or stay),
    sky directions are points at infinity, and the camera moves with the ego."""
    C, n = rig.num_cameras, rig.height * rig.width
    # Homogeneous targets: sky rays keep their direction with w = 0 (a point at infinity).
    target = np.concatenate([rays[:, 3:], np.zeros((len(rays), 1), np.float32)], 1).astype(np.float64)
    target[hits.index, :3] = _advance(hits, poses, street.car_poses(next_time))
    target[hits.index, 3] = 1.0
    uv, depth = rig.project(target.reshape(C, n, 4), street.ego.pose(next_time))
    ahead = depth > 1e-6
    u, v = np.meshgrid(np.arange(rig.width) + 0.5, np.arange(rig.height) + 0.5)
    flow = uv - np.stack([u, v], -1).reshape(1, n, 2)
    # A point that ends up behind the camera has no image position; its flow is 0 by convention.
    return np.where(ahead[..., None], flow, 0).reshape(-1, 2)


def _advance(hits: Hits, poses: np.ndarray, next_poses: np.ndarray) -> np.ndarray:
    """Street-frame hit points [M, 3] carried to the next frame (car points move with their car)."""
    if not len(poses):
        return hits.point.astype(np.float64)
    step = next_poses @ np.linalg.inv(poses)  # [K, 4, 4] street(t) -> street(t+1) per car
    return _per_car_transform(hits.point.astype(np.float64), hits.car, step)


def lidar_sweep(street: Street, caster: Raycaster, directions: np.ndarray, time: float,
                max_range: float) -> np.ndarray:
    """One LiDAR sweep at ``time`` as float32 [N, 14] rows in ``LIDAR_COLUMNS`` order.

    ``directions`` [R, 3] are unit ray directions in the vehicle frame. Columns, vehicle frame:
    origin xyz; point xyz; flow xyz = velocity of the point's object in **m/s** (world motion in
    vehicle-frame axes, 0 off moving cars); flow class (1 vehicle, 0 background); ground (1 on
    road, grass and sidewalk tops); intensity in [0, 1] (albedo luminance times incidence);
    elongation in [0, 0.5] (grows at grazing incidence); laser id (drivestudio's id of
    the sensor, not the beam: 0 = TOP).
    """
    v2s = street.ego.pose(time)
    R = v2s[:3, :3]
    origin = v2s[:3, :3] @ LIDAR_MOUNT + v2s[:3, 3]
    d = directions @ R.T
    rays = np.concatenate([np.broadcast_to(origin, d.shape), d], 1).astype(np.float32)
    hits = caster.cast(rays)
    hits = hits.select(hits.t[hits.index] <= max_range)
    surf_albedo = albedo(hits.material, hit_surfaces(hits, street.car_poses(time)), street.noise)
    cos = np.abs(np.sum(hits.normal * d[hits.index], 1))
    velocity = np.array([c.velocity for c in street.cars] + [np.zeros(3)])  # index -1 -> static
    rows = np.zeros((len(hits.index), LIDAR_NUM_COLUMNS), np.float32)
    rows[:, 0:3] = LIDAR_MOUNT
    rows[:, 3:6] = (hits.point - v2s[:3, 3]) @ R
    rows[:, 6:9] = velocity[hits.car] @ R
    rows[:, 9] = np.where(hits.car >= 0, WAYMO_VEHICLE_FLOW_CLASS, 0)
    rows[:, 10] = np.isin(hits.material, GROUND_MATERIALS) & (hits.normal[:, 2] > 0.9)
    rows[:, 11] = surf_albedo @ np.array([0.299, 0.587, 0.114]) * (0.3 + 0.7 * cos)
    rows[:, 12] = 0.5 * (1 - cos)
    rows[:, 13] = TOP_LIDAR_ID
    return rows
