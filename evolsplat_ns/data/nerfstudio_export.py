"""One drivestudio scene as a nerfstudio dataset (``evolsplat-data export-nerfstudio``).

What is written into the (new or empty) output folder:

- ``transforms.json`` in nerfstudio's format: ``camera_model`` ``OPENCV`` with zero distortion (the
  project treats every camera as a pinhole, see docs/data_formats.md), one entry per (frame,
  camera) with ``file_path``, ``transform_matrix`` (**OpenGL** camera-to-world, nerfstudio's
  convention: x right, y up, z backward) and per-frame intrinsics ``fl_x fl_y cx cy w h`` at the
  image file's own size (rigs mix camera sizes); ``train_filenames`` / ``val_filenames`` /
  ``test_filenames`` (nerfstudio's split by file name: our held-out frames are ``val`` and
  ``test``); ``ply_file_path``; an ``evolsplat`` block with the provenance.
- ``images/``: the scene's images, hard-linked (copied across file systems or with ``copy``);
  the source is never written to.
- ``sparse_pc.ply``: the static RGB point cloud of the scene's context (not held-out) frames from
  our point-cloud generators, for splatfacto's ``load_3D_points`` initialisation.
- ``masks/`` (optional): nerfstudio masks (255 = use the pixel, 0 = ignore) that exclude the
  dynamic and/or sky pixels.

Frames. The export frame ("scene frame") is the vehicle frame at the scene's first context
frame (x forward, y left, z up, metres): the segment frame of the whole-scene segment, so the
point cloud, the poses and our own evaluation's cameras agree. ``evolsplat.frame_to_world`` maps
it to the scene's world frame. nerfstudio's parser by default re-orients, re-centres and rescales
poses *and* the point cloud alike (``dataparser_transform``, ``dataparser_scale``); pass
``orientation_method none``, ``center_method none`` and ``auto_scale_poses False`` to keep
the export frame itself.

The split is :class:`MultiSceneDataset`'s (the scene as its only eval scene, one whole-scene
segment), so the views held out here are exactly those ``evolsplat-infer`` scores.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig
from evolsplat_ns.data.types import PointCloud
from evolsplat_ns.geometry import OPENCV2OPENGL
from evolsplat_ns.utils.errors import UserError
from evolsplat_ns.utils.ply import write_ply

MaskKind = Literal["none", "dynamic", "sky", "dynamic+sky"]
PLY_NAME = "sparse_pc.ply"


@dataclass
class NerfstudioExport:
    """Settings of one export (the CLI's flags)."""

    data: Path
    """One scene folder (drivestudio layout)."""
    out: Path
    """Output folder: must not exist or be empty."""
    eval_frame_interval: int = 4
    """Hold out every k-th frame (as ``dataset.eval_frame_interval``; short scenes adapt as there)."""
    pointcloud_generator: str = "auto"
    """Registered generator for ``sparse_pc.ply`` (``auto`` as the dataset: hybrid, lidar or depth)."""
    masks: MaskKind = "none"
    """Pixels nerfstudio should ignore: moving objects, sky, both, or none (no ``masks/``)."""
    copy: bool = False
    """Copy the images instead of hard-linking them."""


@dataclass
class ExportResult:
    out: Path
    num_train: int
    num_held_out: int
    num_points: int
    held_out_frames: list[int]


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; nothing was written: "
                              "choose a new folder (an export never replaces files)")


def _open_scene(cfg: NerfstudioExport) -> MultiSceneDataset:
    scenes = L.find_scenes(cfg.data)
    if len(scenes) != 1:
        names = ", ".join(p.name for p in scenes[:5])
        raise UserError(f"--data {cfg.data} holds {len(scenes)} scenes ({names}); export-nerfstudio writes one "
                        f"scene: pass one scene folder, e.g. {cfg.data / scenes[0].name if scenes else cfg.data}")
    if cfg.eval_frame_interval < 2:
        raise UserError(f"--eval-frame-interval {cfg.eval_frame_interval}: must be >= 2 (some frames must stay "
                        "for training)")
    ds = MultiSceneDataset(MultiSceneDatasetConfig(
        data=scenes[0], num_eval_scenes=1, eval_frame_interval=cfg.eval_frame_interval, eval_hold_out="frames",
        segment_length=0, num_source_keyframes=1, num_target_keyframes=1, preload=False,
        pointcloud_generator=cfg.pointcloud_generator, load_lidar_for_eval=False))
    if not ds.eval_items:
        ds.close()
        raise UserError(f"scene {scenes[0]}: {len(ds.scenes[0].frames)} frame(s) hold out no frame at interval "
                        f"{cfg.eval_frame_interval}; export-nerfstudio needs a scene of at least 2 frames")
    return ds


def _link(src: Path, dst: Path, copy: bool) -> None:
    """Hard link ``src`` at ``dst`` (a copy when asked or across file systems); never touches ``src``."""
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _write_mask(scene, t: int, cam: int, kind: MaskKind, path: Path) -> None:
    """nerfstudio mask at the image's own size: 0 on ignored pixels (dynamic and/or sky), 255 elsewhere."""
    size = scene.calib[cam].full_size
    ignore = np.zeros((size[1], size[0]), bool)
    lay = scene.layout
    if "dynamic" in kind and lay.has("dynamic_masks"):
        ignore |= L.read_mask(lay.dynamic_mask_path(t, cam), size)
    if "sky" in kind and lay.has("sky_masks"):
        ignore |= L.read_mask(lay.sky_mask_path(t, cam), size)
    L.write_mask(path, ~ignore)


def write_point_cloud_ply(path: Path, pc: PointCloud) -> Path:
    """The static points of ``pc`` as a binary PLY (x y z float, red green blue uchar: what
    nerfstudio's ``load_3D_points`` reads with open3d)."""
    xyz = pc.points.detach().cpu().numpy().astype(np.float32)
    rgb = (pc.colors.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    v = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                  ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    v["x"], v["y"], v["z"] = xyz.T
    v["red"], v["green"], v["blue"] = rgb.T
    return write_ply(path, v, comments=["evolsplat-ns export-nerfstudio: static points, scene frame (metres)"])


def _frame_entry(scene, t: int, cam: int, frame_from_world: np.ndarray, file_path: str) -> dict:
    """One ``frames`` entry: OpenGL camera-to-(scene frame) and the camera's intrinsics at its file size."""
    fu, fv, cu, cv = L.read_intrinsics(scene.layout.intrinsics_path(cam))[:4]
    w, h = scene.calib[cam].full_size
    c2w = frame_from_world @ scene.cam_to_world(t, cam) @ OPENCV2OPENGL
    return {"file_path": file_path, "transform_matrix": c2w.tolist(), "fl_x": float(fu), "fl_y": float(fv),
            "cx": float(cu), "cy": float(cv), "w": int(w), "h": int(h),
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "evolsplat": {"frame": t, "camera": cam}}


def export_nerfstudio(cfg: NerfstudioExport) -> ExportResult:
    """Write ``cfg.data`` (one scene) as a nerfstudio dataset into ``cfg.out``; see the module doc.

    Refuses (FileExistsError) an existing non-empty ``out`` before anything is read or written.
    """
    out = Path(cfg.out)
    _check_out(out)
    ds = _open_scene(cfg)
    try:
        scene = ds.scenes[0]
        held = sorted({t for _, t in ds.eval_items})
        seg = ds.segments[0]
        frame_to_world = scene.ego_to_world[seg.frames[0]]
        frame_from_world = np.linalg.inv(frame_to_world)
        pc = ds.point_cloud(0)  # context frames only: held-out frames are in no point cloud
        out.mkdir(parents=True, exist_ok=True)
        (out / "images").mkdir()
        if cfg.masks != "none":
            (out / "masks").mkdir()
        frames, train, test = [], [], []
        for t in scene.frames:
            for cam in scene.cameras:
                src = scene.layout.image_path(t, cam)
                rel = f"images/{src.name}"
                _link(src, out / rel, cfg.copy)
                entry = _frame_entry(scene, t, cam, frame_from_world, rel)
                if cfg.masks != "none":
                    entry["mask_path"] = f"masks/{t:03d}_{cam}.png"
                    _write_mask(scene, t, cam, cfg.masks, out / entry["mask_path"])
                frames.append(entry)
                (test if t in held else train).append(rel)
        write_point_cloud_ply(out / PLY_NAME, pc)
        meta = {
            "camera_model": "OPENCV", "ply_file_path": PLY_NAME, "frames": frames,
            "train_filenames": train, "val_filenames": test, "test_filenames": test,
            "evolsplat": {
                "source": str(Path(scene.layout.root).resolve()), "scene": scene.name,
                "frame": "vehicle frame at the scene's first context frame (x forward, y left, z up; metres)",
                "frame_to_world": frame_to_world.tolist(), "reference_frame": int(seg.frames[0]),
                "held_out_frames": held, "eval_frame_interval": ds.plans[scene.name].get("eval_frame_interval"),
                "pointcloud": {k: v for k, v in pc.metadata.items() if isinstance(v, (int, str))},
                "masks": cfg.masks, "dynamic_points": "moving objects' points are left out (static cloud)",
            },
        }
        L.write_json(out / "transforms.json", meta)
        return ExportResult(out, len(train), len(test), len(pc), held)
    finally:
        ds.close()
