"""Writing one synthetic scene in the drivestudio layout (through ``evolsplat_ns.data.layout``)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

from evolsplat_ns.data import layout
from evolsplat_ns.data.synth.config import SynthConfig
from evolsplat_ns.data.synth.render import CameraFrame
from evolsplat_ns.data.synth.sensors import CAMERA_MOUNTS, CameraRig, camera_mounts, camera_name
from evolsplat_ns.data.synth.street import Street

# Everything a scene folder may hold that this writer produces (removed by ``clear``).
SCENE_ENTRIES = (layout.CAMERAS_FILE, "images", "intrinsics", "extrinsics", "ego_pose", "lidar", "sky_masks", "dynamic_masks",
                 "instances", "instance_masks", "instances_gt", "depth", "flow")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class SceneWriter:
    """Writes the files of one scene folder; paths come from ``layout.SceneLayout``."""

    def __init__(self, root: Path, cfg: SynthConfig):
        self.cfg = cfg
        self.layout = layout.SceneLayout(root=Path(root), frames=list(range(cfg.frames)),
                                         cameras=list(range(cfg.cameras)))

    def clear(self) -> None:
        """Remove this writer's modality folders from an existing scene folder (``--overwrite``)."""
        for name in SCENE_ENTRIES:
            path = self.layout.root / name
            if path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)

    def write_calibration(self, rig: CameraRig) -> None:
        """intrinsics/{cam}.txt (fu fv cu cv 0 0 0 0 0) and extrinsics/{cam}.txt (camera-to-vehicle,
        Waymo camera axes)."""
        for cam in self.layout.cameras:
            layout.write_intrinsics(self.layout.intrinsics_path(cam), rig.intrinsics_row(cam))
            layout.write_matrix4(self.layout.extrinsics_path(cam), rig.extrinsics[cam])
        if self.cfg.cameras > len(CAMERA_MOUNTS):  # ring rigs name their cameras; Waymo's need no file
            names = {str(k): camera_name(yaw) for k, (_, yaw, _) in enumerate(camera_mounts(self.cfg.cameras))}
            layout.write_json(self.layout.cameras_file, {"names": names})

    def write_frame(self, t: int, vehicle_to_world: np.ndarray, frame: CameraFrame, lidar: np.ndarray) -> None:
        """Ego pose, LiDAR [N, 14] and every camera's image, depth, flow and masks of frame ``t``."""
        L = self.layout
        layout.write_matrix4(L.ego_pose_path(t), vehicle_to_world)
        layout.write_lidar(L.lidar_path(t), lidar)
        for cam in L.cameras:
            layout.write_image(L.image_path(t, cam), frame.rgb[cam], quality=self.cfg.jpeg_quality)
            layout.write_mask(L.sky_mask_path(t, cam), frame.sky[cam])
            layout.write_mask(L.dynamic_mask_path(t, cam, "all"), frame.dynamic[cam])
            layout.write_mask(L.dynamic_mask_path(t, cam, "vehicle"), frame.dynamic[cam])
            layout.write_mask(L.dynamic_mask_path(t, cam, "human"), np.zeros_like(frame.dynamic[cam]))
            layout.write_instance_mask(L.instance_mask_path(t, cam), frame.instance[cam])
            layout.write_bytes(L.depth_path(t, cam), _npy_bytes(frame.depth[cam]))
            layout.write_bytes(L.flow_path(t, cam), _npy_bytes(frame.flow[cam]))

    def write_instances(self, street: Street) -> None:
        """instances/instances_info.json and frame_instances.json (drivestudio format).

        Every car is an instance (parked ones too, static). A car is annotated in the frames where
        its box centre lies within LiDAR range of the ego, like Waymo's labels. With box noise
        (``box_noise_trans`` / ``box_noise_rot``), ``instances/`` holds boxes perturbed per frame
        (horizontal position, yaw; seeded) and ``instances_gt/`` the true ones.
        """
        info: dict[str, dict] = {}
        true_info: dict[str, dict] = {}
        noisy = self.cfg.box_noise_trans > 0 or self.cfg.box_noise_rot > 0
        rng = np.random.default_rng([self.cfg.seed, sum(map(ord, self.layout.root.name)), 17])
        per_frame: dict[str, list[int]] = {str(t): [] for t in self.layout.frames}
        for car_id, car in enumerate(street.cars):
            ann = {"frame_idx": [], "obj_to_world": [], "box_size": []}
            true_poses = []
            for t in self.layout.frames:
                time = t * self.cfg.dt
                pose = car.pose(time)
                ego_xy = street.ego.pose(time)[:2, 3]
                if np.linalg.norm(pose[:2, 3] - ego_xy) > self.cfg.lidar_range:
                    continue
                ann["frame_idx"].append(t)
                true_poses.append(street.street_to_world @ pose)
                written = street.street_to_world @ (pose @ self._box_noise(rng) if noisy else pose)
                ann["obj_to_world"].append(written.tolist())
                ann["box_size"].append([float(v) for v in car.size])
                per_frame[str(t)].append(car_id)
            if ann["frame_idx"]:
                info[str(car_id)] = {"id": car_id, "class_name": "Vehicle", "frame_annotations": ann}
                true_info[str(car_id)] = {**info[str(car_id)], "frame_annotations": {
                    **ann, "obj_to_world": [T.tolist() for T in true_poses]}}
        layout.write_json(self.layout.instances_info_path, info)
        layout.write_json(self.layout.frame_instances_path, per_frame)
        if noisy:
            layout.write_json(self.layout.true_instances_info_path, true_info)

    def _box_noise(self, rng: np.random.Generator) -> np.ndarray:
        """[4, 4] box-local perturbation: yaw ~ N(0, box_noise_rot deg) about the box's z (up), then
        a horizontal shift ~ N(0, box_noise_trans m) per axis."""
        yaw = np.deg2rad(rng.normal(0.0, self.cfg.box_noise_rot))
        c, s = np.cos(yaw), np.sin(yaw)
        T = np.eye(4)
        T[:2, :2] = [[c, -s], [s, c]]
        T[:2, 3] = rng.normal(0.0, self.cfg.box_noise_trans, 2)
        return T
