"""nerfstudio's ``splatfacto`` on one exported scene for a wall-time budget, scored on our held-out views.

splatfacto runs through nerfstudio's own trainer config (``method_configs["splatfacto"]``, every
default kept: its 30k-step schedules, densification, SH warm-up) in-process: each iteration runs
nerfstudio's callbacks before and after ``Trainer.train_iteration``, exactly as ``ns-train``'s loop
does, and the clock counts only those iterations (data loading and our evaluations excluded). It
stops when the budget is spent. Every ``eval_every_s`` seconds of training, its Gaussians are
rendered at *our* held-out cameras (the eval samples of our data set, mapped into splatfacto's
frame: export frame, OpenGL, then its ``dataparser_transform`` and ``dataparser_scale``) and scored by
``engine.evaluation.view_metrics``: the same views, sizes and metrics as our model.

Needs CUDA (splatfacto rasterises with gsplat's CUDA kernels). Where open3d is missing (the GPU
machine), nerfstudio's PLY loading is replaced by the same computation on our own PLY reader.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def _load_points_without_open3d(self, ply_file_path: Path, transform_matrix: torch.Tensor, scale_factor: float):
    """``Nerfstudio._load_3D_points`` (nerfstudio 1.1.5) with our PLY reader instead of open3d's."""
    from evolsplat_ns.utils.ply import read_ply

    v, _ = read_ply(ply_file_path)
    if len(v) == 0:
        return None
    xyz = torch.from_numpy(np.stack([v["x"], v["y"], v["z"]], -1).astype(np.float32))
    xyz = torch.cat([xyz, torch.ones_like(xyz[:, :1])], -1) @ transform_matrix.T
    rgb = torch.from_numpy(np.stack([v["red"], v["green"], v["blue"]], -1).astype(np.uint8))
    return {"points3D_xyz": xyz * scale_factor, "points3D_rgb": rgb}


class _NoLpips(torch.nn.Module):
    """Stands in for splatfacto's torchmetrics LPIPS, whose constructor downloads AlexNet weights
    (no network on the GPU machine). This benchmark scores splatfacto with our own
    ``view_metrics``, never with splatfacto's eval metrics, so it is never called."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs):
        raise RuntimeError("LPIPS is unavailable here: it needs pretrained AlexNet weights")


def splatfacto_trainer(export_dir: Path, out_dir: Path):
    """nerfstudio's splatfacto trainer on ``export_dir`` (full resolution, no viewer), set up."""
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.data.dataparsers import nerfstudio_dataparser

    if importlib.util.find_spec("open3d") is None:
        nerfstudio_dataparser.Nerfstudio._load_3D_points = _load_points_without_open3d
    import torchmetrics.image.lpip

    torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity = _NoLpips
    cfg = copy.deepcopy(method_configs["splatfacto"])
    cfg.data = cfg.pipeline.datamanager.data = Path(export_dir)
    cfg.pipeline.datamanager.dataparser.downscale_factor = 1
    cfg.output_dir, cfg.timestamp, cfg.vis = Path(out_dir), "budget", "tensorboard"
    cfg.machine.device_type = "cuda"
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def ns_camera(dataparser_outputs, frame_from_world: np.ndarray, sample, v: int, c2w: Optional[torch.Tensor] = None):
    """nerfstudio Cameras (splatfacto's frame) of target ``v`` of our eval ``sample`` (or of the OpenCV
    camera-to-segment ``c2w`` with that target's intrinsics and size)."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    from evolsplat_ns.geometry import OPENCV2OPENGL

    t = sample.target
    pose = (c2w if c2w is not None else t.camtoworlds[v]).double().cpu().numpy()
    gl = frame_from_world @ sample.segment_to_world.double().numpy() @ pose @ OPENCV2OPENGL
    T = dataparser_outputs.dataparser_transform.double().numpy()  # [3, 4]
    ns = T @ gl
    ns[:3, 3] *= dataparser_outputs.dataparser_scale
    K = t.intrinsics[v]
    return Cameras(camera_to_worlds=torch.from_numpy(ns).float()[None], fx=K[0, 0:1][None], fy=K[1, 1:2][None],
                   cx=K[0, 2:3][None], cy=K[1, 2:3][None], width=torch.tensor([[t.width]]),
                   height=torch.tensor([[t.height]]), camera_type=CameraType.PERSPECTIVE)


@torch.no_grad()
def score_splatfacto(model, dataparser_outputs, frame_from_world: np.ndarray, dataset) -> dict:
    """splatfacto rendered at every held-out view of our ``dataset``, scored by ``view_metrics``."""
    from evolsplat_ns.engine.evaluation import next_frame, summarise, view_metrics

    was_training = model.training
    model.eval()
    per_scene: dict[str, list[dict]] = defaultdict(list)
    for i in range(len(dataset.eval_items)):
        sample = dataset.eval_sample(i)

        def render(c2w, K, width, height, time=None, sample=sample):
            out = model.get_outputs_for_camera(ns_camera(dataparser_outputs, frame_from_world, sample, v, c2w))
            return {"rgb": out["rgb"].float().cpu()}

        for v in range(len(sample.target)):
            out = render(sample.target.camtoworlds[v], None, None, None)
            per_scene[sample.key.scene].append(view_metrics(sample, v, out, render, next_frame(dataset, sample, v)))
    model.train(was_training)
    return summarise(per_scene)


def run_splatfacto(export_dir: Path, out_dir: Path, budget_s: float, dataset, eval_every_s: float) -> dict:
    """Train splatfacto for ``budget_s`` seconds of iterations, scoring it every ``eval_every_s`` s
    and at the end; returns ``{"log": [...], "final": metrics, "steps": n, "seconds": s}``."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    meta = json.loads((Path(export_dir) / "transforms.json").read_text())
    frame_from_world = np.linalg.inv(np.array(meta["evolsplat"]["frame_to_world"]))
    trainer = splatfacto_trainer(export_dir, out_dir)
    outputs = trainer.pipeline.datamanager.train_dataparser_outputs
    model = trainer.pipeline.model
    log = [{"step": 0, "seconds": 0.0, **_brief(score_splatfacto(model, outputs, frame_from_world, dataset))}]
    elapsed, step, next_eval = 0.0, 0, eval_every_s
    while elapsed < budget_s:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.pipeline.train()
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        trainer.train_iteration(step)
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        step += 1
        if elapsed >= next_eval:
            log.append({"step": step, "seconds": elapsed,
                        **_brief(score_splatfacto(model, outputs, frame_from_world, dataset))})
            next_eval += eval_every_s
    final = score_splatfacto(model, outputs, frame_from_world, dataset)
    log.append({"step": step, "seconds": elapsed, **_brief(final)})
    return {"log": log, "final": final, "steps": step, "seconds": elapsed,
            "gaussians": int(model.num_points)}


def _brief(metrics: dict) -> dict:
    return {"held_out_psnr": metrics.get("psnr"), "held_out_ssim": metrics.get("ssim")}
