"""Laser-label boxes -> drivestudio instances JSON and dynamic-object masks.

Follows drivestudio's Waymo preprocessing: instances cover the classes that can move (Vehicle,
Pedestrian, Cyclist; signs are left out); a camera's dynamic mask is the union of the image-axis
bounding rectangles of projected 3D boxes whose label speed exceeds 1 m/s, skipping boxes with
no LiDAR points (likely occluded) and boxes with a corner behind the camera. Boxes are projected
with the pinhole part of the intrinsics (distortion not applied, as everywhere in the layout).
"""

from __future__ import annotations

import numpy as np

from evolsplat_ns.data.waymo.frame import BoxLabel, CameraData
from evolsplat_ns.geometry import OPENCV2DATASET

DYNAMIC_SPEED_MPS = 1.0
MOVABLE_CLASSES = ("Vehicle", "Pedestrian", "Cyclist")
# dynamic_masks/{group}/ -> classes drawn into it
MASK_GROUPS = {"all": MOVABLE_CLASSES, "human": ("Pedestrian", "Cyclist"), "vehicle": ("Vehicle",)}

_UNIT_CORNERS = np.array([[x, y, z] for x in (0.5, -0.5) for y in (0.5, -0.5) for z in (0.5, -0.5)])


def box_to_vehicle(label: BoxLabel) -> np.ndarray:
    """[4, 4] object-to-vehicle: object x along the heading, z up, origin at the box centre."""
    c, s = np.cos(label.heading), np.sin(label.heading)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = label.center
    return T


def box_corners(label: BoxLabel) -> np.ndarray:
    """[8, 3] box corners in the vehicle frame."""
    T = box_to_vehicle(label)
    return (_UNIT_CORNERS * label.size) @ T[:3, :3].T + T[:3, 3]


class InstanceTable:
    """Accumulates laser labels over a segment into drivestudio's instance JSON.

    Waymo's string object ids become ints 0, 1, ... in order of first appearance.
    """

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.info: dict[str, dict] = {}
        self.frames: dict[str, list[int]] = {}

    def add_frame(self, t: int, labels: list[BoxLabel], vehicle_to_world: np.ndarray) -> None:
        """Record the movable-class boxes of frame ``t``; ``vehicle_to_world`` [4, 4] is its ego pose."""
        present = self.frames.setdefault(str(t), [])
        for label in labels:
            if label.class_name not in MOVABLE_CLASSES:
                continue
            idx = self.ids.setdefault(label.object_id, len(self.ids))
            entry = self.info.setdefault(str(idx), {
                "id": idx, "class_name": label.class_name,
                "frame_annotations": {"frame_idx": [], "obj_to_world": [], "box_size": []}})
            ann = entry["frame_annotations"]
            ann["frame_idx"].append(t)
            ann["obj_to_world"].append((vehicle_to_world @ box_to_vehicle(label)).tolist())
            ann["box_size"].append([float(v) for v in label.size])
            present.append(idx)

    def to_json(self) -> tuple[dict, dict]:
        """(instances_info, frame_instances) as drivestudio writes them."""
        return self.info, self.frames


def _is_visible_mover(label: BoxLabel, classes: tuple[str, ...], top_counts_available: bool) -> bool:
    if label.class_name not in classes or label.speed <= DYNAMIC_SPEED_MPS:
        return False
    # drivestudio's occlusion proxy: prefer the TOP-laser count when the segment has one
    points = label.num_top_lidar_points if top_counts_available else label.num_lidar_points
    return points > 0


def project_box_rect(label: BoxLabel, camera: CameraData) -> tuple[int, int, int, int] | None:
    """Integer pixel rectangle (u0, v0, u1, v1), clipped to the image, covering the projected box.

    None if any corner is behind the camera or the rectangle is empty.
    """
    # vehicle -> OpenCV camera axes (x right, y down, z forward)
    vehicle_to_cv = np.linalg.inv(camera.extrinsic @ OPENCV2DATASET)
    cam = box_corners(label) @ vehicle_to_cv[:3, :3].T + vehicle_to_cv[:3, 3]
    if np.any(cam[:, 2] <= 1e-3):
        return None
    fu, fv, cu, cv = camera.intrinsics[:4]
    u = np.clip(fu * cam[:, 0] / cam[:, 2] + cu, 0, camera.width)
    v = np.clip(fv * cam[:, 1] / cam[:, 2] + cv, 0, camera.height)
    u0, u1, v0, v1 = int(u.min()), int(u.max()), int(v.min()), int(v.max())
    if u1 <= u0 or v1 <= v0:
        return None
    return u0, v0, u1, v1


def dynamic_mask(labels: list[BoxLabel], camera: CameraData, classes: tuple[str, ...]) -> np.ndarray:
    """bool [H, W] of ``camera``'s image: True inside projected boxes of moving ``classes`` objects."""
    mask = np.zeros((camera.height, camera.width), dtype=bool)
    top_counts = any(label.num_top_lidar_points > 0 for label in labels)
    for label in labels:
        if not _is_visible_mover(label, classes, top_counts):
            continue
        rect = project_box_rect(label, camera)
        if rect is not None:
            u0, v0, u1, v1 = rect
            mask[v0:v1, u0:u1] = True
    return mask
