"""The nearest-source-view baseline: each held-out view is the nearest source image reprojected
with depth, scored on the same held-out views with the same metrics as the model.

Method. **Forward splatting** of the source pixels: every source pixel is lifted to 3D with the
source's own depth, projected into the target camera and kept where it is the nearest (a
z-buffer); holes of up to ``fill_radius`` pixels (magnification, small disocclusions) are filled
from their valid neighbours; what no source pixel reaches stays black. Forward, not backward
warping, because backward warping needs the *target's* depth, and the held-out frame's depth
(or LiDAR) is ground truth of the view being predicted: no held-out data may be an input.

Depth of the source: its dense depth map (``depth/``, OpenCV z) where the scene has one, where 0
(sky, no return) is placed at ``far`` metres, so sky moves by the camera rotation only (points at
infinity); otherwise the source frame's LiDAR sweep projected into the source (sparse, so more
is left to the hole filling).

The source: among the eval sample's sources (the nearest context keyframes, as the model gets),
the view of the target's camera nearest to the target position; another camera if that one is
missing. Frames: OpenCV camera-to-segment throughout.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.data.pointcloud.ops import zbuffer
from evolsplat_ns.data.types import Sample
from evolsplat_ns.engine.evaluation import next_frame, summarise, view_metrics
from evolsplat_ns.geometry import invert_rigid, project_points

FAR = 1.0e4
"""Metres at which pixels without depth (sky) are placed: far enough to move by rotation only."""


def unproject(depth: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """[H, W, 3] points (c2w's frame) of every pixel centre at OpenCV z-depth ``depth`` [H, W]."""
    H, W = depth.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=depth.dtype), torch.arange(W, dtype=depth.dtype), indexing="ij")
    x = (xs + 0.5 - K[0, 2]) / K[0, 0] * depth
    y = (ys + 0.5 - K[1, 2]) / K[1, 1] * depth
    cam = torch.stack([x, y, depth], dim=-1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def splat(points: torch.Tensor, colors: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, width: int, height: int,
          fill_radius: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-splat coloured ``points`` [N, 3] into a camera (OpenCV ``c2w`` [4, 4], ``K`` [3, 3])
    with a z-buffer, then fill holes up to ``fill_radius`` px. Returns rgb [H, W, 3] and the valid
    mask [H, W] (pixels some point reached before filling)."""
    uv, z = project_points(points, K[None], invert_rigid(c2w)[None])
    uv, z = uv[0], z[0]
    zbuf = zbuffer(uv, z, width, height)  # [H, W] nearest depth per pixel
    ix, iy = uv[:, 0].floor().long(), uv[:, 1].floor().long()
    inside = (z > 0) & (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    pix = (iy * width + ix)[inside]
    winner = z[inside] <= zbuf.reshape(-1)[pix] * (1 + 1e-6)
    rgb = torch.zeros(height * width, 3, dtype=colors.dtype)
    rgb[pix[winner]] = colors[inside][winner]
    valid = torch.isfinite(zbuf)
    return fill_holes(rgb.view(height, width, 3), valid, fill_radius), valid


def fill_holes(rgb: torch.Tensor, valid: torch.Tensor, radius: int) -> torch.Tensor:
    """Fill invalid pixels of ``rgb`` [H, W, 3] with the mean of their valid 3x3 neighbours,
    ``radius`` times (each pass grows the filled region by one pixel)."""
    img, ok = rgb.permute(2, 0, 1)[None].clone(), valid[None, None].to(rgb.dtype)
    for _ in range(radius):
        total = F.avg_pool2d(img * ok, 3, stride=1, padding=1, count_include_pad=False)
        weight = F.avg_pool2d(ok, 3, stride=1, padding=1, count_include_pad=False)
        grow = (ok == 0) & (weight > 0)
        img = torch.where(grow, total / weight.clamp(min=1e-8), img)
        ok = torch.where(grow, torch.ones_like(ok), ok)
    return img[0].permute(1, 2, 0)


def nearest_source(sample: Sample, v: int) -> int:
    """Index in ``sample.source`` of the view of target ``v``'s camera nearest to it (any camera
    when the sources lack that one)."""
    src, tgt = sample.source, sample.target
    same = (src.cam_ids == tgt.cam_ids[v]).nonzero()[:, 0]
    pool = same if len(same) else torch.arange(len(src))
    dist = (src.camtoworlds[pool, :3, 3] - tgt.camtoworlds[v, :3, 3]).norm(dim=-1)
    return int(pool[int(dist.argmin())])


def source_points(dataset: MultiSceneDataset, sample: Sample, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coloured 3D points [N, 3], [N, 3] (segment frame) of source view ``s``: every pixel with
    its depth map (no depth: at ``FAR``), or the frame's LiDAR points that land in the image."""
    scene = dataset.scenes[dataset.segments[dataset.segment_index(sample.key)].scene_index]
    view = sample.source.select([s])
    t, cam = int(view.frame_ids[0]), int(view.cam_ids[0])
    seg_from_world = np.linalg.inv(sample.segment_to_world.double().numpy())
    image, K, c2w = view.images[0], view.intrinsics[0], view.camtoworlds[0]
    if scene.layout.has("depth"):
        depth = scene.load_view_pairs([(t, cam)], seg_from_world, depth=True).depths[0]
        depth = torch.where(depth > 0, depth, torch.full_like(depth, FAR))
        return unproject(depth, K, c2w).reshape(-1, 3), image.reshape(-1, 3)
    pts = scene.load_lidar([t], seg_from_world).points
    uv, z = project_points(pts, K[None], invert_rigid(c2w)[None])
    ix, iy = uv[0, :, 0].floor().long(), uv[0, :, 1].floor().long()
    ok = (z[0] > 0.1) & (ix >= 0) & (ix < view.width) & (iy >= 0) & (iy < view.height)
    return pts[ok], image[iy[ok], ix[ok]]


def reproject_view(dataset: MultiSceneDataset, sample: Sample, v: int, fill_radius: int) -> \
        Callable[[torch.Tensor, torch.Tensor, int, int, float], dict]:
    """A renderer (``engine.evaluation.Renderer``) that splats target ``v``'s nearest source into any camera."""
    pts, cols = source_points(dataset, sample, nearest_source(sample, v))

    def render(c2w, K, width, height, time=None):
        rgb, valid = splat(pts, cols, K.cpu().float(), c2w.cpu().float(), width, height, fill_radius)
        return {"rgb": rgb, "accumulation": valid[..., None].float()}

    return render


def evaluate_nearest_source(dataset: MultiSceneDataset, fill_radius: Optional[int] = None, progress: bool = False,
                            on_view: Optional[Callable[[Sample, int, dict, dict], None]] = None) -> dict:
    """Every held-out view of ``dataset`` as its nearest source reprojected, scored by
    ``view_metrics``; the :func:`summarise` report (mean, per scene). ``fill_radius`` defaults to
    1% of the image width (at least 1 px). ``on_view(sample, v, rendered, metrics)`` sees each view."""
    per_scene: dict[str, list[dict]] = defaultdict(list)
    for i in tqdm(range(len(dataset.eval_items)), desc="nearest source view", disable=not progress):
        sample = dataset.eval_sample(i)
        t = sample.target
        radius = fill_radius if fill_radius is not None else max(1, round(0.01 * t.width))
        for v in range(len(t)):
            render = reproject_view(dataset, sample, v, radius)
            out = render(t.camtoworlds[v], t.intrinsics[v], t.width, t.height)
            metrics = view_metrics(sample, v, out, render, next_frame(dataset, sample, v))
            per_scene[sample.key.scene].append(metrics)
            if on_view is not None:
                on_view(sample, v, out, metrics)
    return summarise(per_scene)
