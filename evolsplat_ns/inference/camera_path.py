"""Camera paths for videos: one camera riding along the ego trajectory of a scene, interpolated.

Poses are OpenCV camera-to-world (the scene's world frame) along the path and OpenCV
camera-to-segment when rendered; rotations are interpolated by quaternion slerp and positions
linearly between consecutive frames (``geometry.interpolate_pose``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import numpy as np
import torch

from evolsplat_ns.data.cameras import front_camera
from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.data.scene import SceneData
from evolsplat_ns.data.segments import nearest_sources
from evolsplat_ns.geometry import interpolate_pose

if TYPE_CHECKING:
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel


@dataclass
class PathPose:
    """One pose of a camera path.

    Attributes:
        nearest_frame: the scene frame closest in time (picks the segment and source views).
        cam_to_world: [4, 4] float64 OpenCV camera-to-world.
        time: scene time in frame units (fractional between frames; places the moving actors).
    """

    nearest_frame: int
    cam_to_world: np.ndarray
    time: float = 0.0


def ego_camera_path(scene: SceneData, num_poses: int, cam: Optional[int] = None) -> list[PathPose]:
    """``num_poses`` poses of camera ``cam`` (default FRONT) evenly spaced in time along the scene's
    ego trajectory, from its first to its last frame."""
    if num_poses < 1:
        raise ValueError(f"a camera path needs at least one pose, got {num_poses}")
    cam = front_camera(scene.cameras) if cam is None else cam
    frames = scene.frames
    poses = []
    for u in np.linspace(0.0, len(frames) - 1, num_poses):
        i = min(int(np.floor(u)), len(frames) - 2) if len(frames) > 1 else 0
        a, b = frames[i], frames[min(i + 1, len(frames) - 1)]
        pose = interpolate_pose(scene.cam_to_world(a, cam), scene.cam_to_world(b, cam), float(u - i))
        poses.append(PathPose(frames[int(round(u))], pose, a + float(u - i) * (b - a)))
    return poses


@torch.no_grad()
def render_camera_path(model: EVolSplatModel, dataset: MultiSceneDataset, scene_index: int, path: Iterable[PathPose],
                       cam: Optional[int] = None) -> Iterator[np.ndarray]:
    """Render ``path`` (a camera of scene ``scene_index``) with ``model``; yields uint8 [H, W, 3].

    Each pose uses the segment nearest in time and that segment's ``num_source_keyframes``
    keyframes nearest to it as sources; the encoded state is reused while those stay the same.
    """
    scene = dataset.scenes[scene_index]
    cam = front_camera(scene.cameras) if cam is None else cam
    K = torch.from_numpy(scene.calib[cam].K).float().to(model.device)
    width, height = scene.image_size(cam)
    encoded_for, state, seg_from_world = None, None, None
    for pose in path:
        seg = dataset.nearest_segment(scene_index, pose.nearest_frame)
        sources = nearest_sources(dataset.keyframes(seg), [pose.nearest_frame],
                                  dataset.config.num_source_keyframes, scene.ego_to_world)
        if encoded_for != (seg, tuple(sources)):
            # The sample's target is irrelevant here; its first source frame keeps it cheap.
            sample = dataset.load_sample(seg, sources, sources[:1])
            model.set_context(sample.key, sample.source, dataset.point_cloud(seg))
            state = model.encode(split_backward=False)
            seg_from_world = torch.linalg.inv(sample.segment_to_world.double())
            encoded_for = (seg, tuple(sources))
        c2w = (seg_from_world @ torch.from_numpy(pose.cam_to_world)).float().to(model.device)
        rgb = model.render(state, c2w, K, width, height, time=pose.time, reuse_graphs=True)["rgb"]
        yield (rgb.clamp(0, 1) * 255).round().byte().cpu().numpy()
