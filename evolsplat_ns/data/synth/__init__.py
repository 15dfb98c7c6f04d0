"""Synthetic driving scenes (``evolsplat-synth``): a ray-cast procedural street in drivestudio layout.

Use :func:`generate_dataset` / :func:`generate_scene` with a :class:`SynthConfig`; see
``street`` (geometry), ``textures`` (albedo), ``sensors`` (cameras, LiDAR, ray casting),
``render`` (shading, depth, flow, masks, LiDAR rows) and ``writer`` (files).
"""

from evolsplat_ns.data.synth.config import SynthConfig
from evolsplat_ns.data.synth.generate import SceneExistsError, generate_dataset, generate_scene, scene_dir

__all__ = ["SynthConfig", "SceneExistsError", "generate_dataset", "generate_scene", "scene_dir"]
