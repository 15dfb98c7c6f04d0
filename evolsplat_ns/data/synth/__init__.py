"""Synthetic driving scenes (``evolsplat-synth``): a ray-cast procedural street in drivestudio layout.

Use :func:`generate_dataset` / :func:`generate_scene` with a :class:`SynthConfig`. A scene folder
(``OUT/000``, ...) holds every file of :mod:`evolsplat_ns.data.layout`:

- ``images/{t:03d}_{cam}.jpg``, cameras 0 FRONT, 1 FRONT_LEFT (yaw +45), 2 FRONT_RIGHT (-45),
  3 SIDE_LEFT (+90), 4 SIDE_RIGHT (-90); ``intrinsics/{cam}.txt`` (fu fv cu cv, no distortion);
  ``extrinsics/{cam}.txt`` camera-to-vehicle in Waymo camera axes; ``ego_pose/{t:03d}.txt``.
- ``lidar/{t:03d}.bin``: 14 columns, vehicle frame; flow columns are m/s (see ``render.lidar_sweep``).
- ``depth/`` (float32 OpenCV z-depth, 0 = sky), ``flow/`` (float16 pixel motion t -> t+1, same
  camera, ego motion and moving cars included, zeros on the last frame), ``sky_masks/``,
  ``dynamic_masks/{all,vehicle,human}/`` (moving cars; no pedestrians, so ``human`` is empty).
- ``instances/``: every car (moving and parked) as a drivestudio "Vehicle" instance.

Modules: ``street`` (layout and geometry), ``mesh`` (triangles and primitives), ``textures``
(albedo), ``sensors`` (cameras, LiDAR, ray casting), ``raycast_torch`` (the pure-torch ray caster
used where open3d is absent: ``SynthConfig.raycaster`` / ``device``), ``render`` (shading, depth,
flow, masks, LiDAR rows), ``writer`` (files), ``generate`` (the loop). Nothing here needs open3d.
"""

from evolsplat_ns.data.synth.config import SynthConfig
from evolsplat_ns.data.synth.generate import SceneExistsError, generate_dataset, generate_scene, scene_dir

__all__ = ["SynthConfig", "SceneExistsError", "generate_dataset", "generate_scene", "scene_dir"]
