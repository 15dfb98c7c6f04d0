"""The one held-out evaluation loop, shared by ``ns-eval`` (the pipeline) and ``evolsplat-infer``.

For every eval item (one held-out frame of one segment) of the data manager's dataset, the segment is made the model's context
with the item's source views, the shared state is encoded once from all of them (as in training),
and each target camera is predicted and rasterised (``EVolSplatModel.render``: the
``num_neighbour_select`` sources nearest to the target feed its heads). Each view is scored by the
model's image metrics plus LiDAR depth error where the sample has LiDAR; :func:`summarise`
aggregates per scene and overall. Because both tools run exactly this loop, they report the same
numbers on the same checkpoint and views.

Frames: targets are OpenCV camera-to-segment; LiDAR points are in the segment frame.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from evolsplat_ns.data.types import Sample
from evolsplat_ns.geometry import invert_rigid, project_points
from evolsplat_ns.data.dataset import MultiSceneDataset
from evolsplat_ns.model.metrics import (
    depth_metrics, dilate, image_metrics, masked_region_metrics, perceptual_status, region_metrics, warp_error,
)
from evolsplat_ns.model.node import concat_gaussians
from evolsplat_ns.model.predictor import SharedState
from evolsplat_ns.utils.timing import StageTimer

if TYPE_CHECKING:
    from evolsplat_ns.engine.datamanager import EVolSplatDataManager
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel


@dataclass
class HeldOutView:
    """One scored held-out view.

    Attributes:
        sample: the eval sample (its ``target`` holds the view).
        view: index of the view in ``sample.target``.
        outputs: rgb [H, W, 3], depth [H, W, 1], accumulation [H, W, 1], gaussians.
        metrics: psnr, ssim (lpips, stlpips when available), LiDAR depth errors when the sample has LiDAR.
        images: ``img`` (prediction | ground truth | error), ``depth`` (colour-mapped), ``accumulation``.
    """

    sample: Sample
    view: int
    outputs: dict[str, torch.Tensor]
    metrics: dict[str, float]
    images: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        """``{scene}_{frame:03d}_{cam}``: the view's file stem in rendered outputs."""
        t = self.sample.target
        return f"{self.sample.key.scene}_{int(t.frame_ids[self.view]):03d}_{int(t.cam_ids[self.view])}"


def lidar_depth_metrics(sample: Sample, v: int, depth: torch.Tensor) -> dict[str, float]:
    """Depth error of ``depth`` [H, W, 1] (OpenCV z, metres) against the LiDAR points of target
    ``v``'s frame projected into it; empty when the sample has no LiDAR."""
    if sample.lidar is None:
        return {}
    t = int(sample.target.frame_ids[v])
    pts = sample.lidar.points[sample.lidar.frame_ids == t].to(depth.device)
    w2c = invert_rigid(sample.target.camtoworlds[v : v + 1].to(depth.device))
    uv, z = project_points(pts, sample.target.intrinsics[v : v + 1].to(depth.device), w2c)
    return depth_metrics(depth, uv[0], z[0])


@dataclass
class NextFrame:
    """The same camera one frame later, for the temporal (flow-warping) error of a held-out view.

    Attributes: c2w [4, 4] OpenCV camera-to-segment at t+1; image [H, W, 3] its ground truth;
    flow [H, W, 2] ground-truth flow t -> t+1 (pixels); time t+1.
    """

    c2w: torch.Tensor
    image: torch.Tensor
    flow: torch.Tensor
    time: float


def next_frame(dataset: MultiSceneDataset, sample: Sample, v: int) -> Optional[NextFrame]:
    """Target ``v``'s camera at the next frame, when the scene has that frame and GT flow."""
    scene = dataset.scenes[dataset.segments[dataset.segment_index(sample.key)].scene_index]
    t, cam = int(sample.target.frame_ids[v]), int(sample.target.cam_ids[v])
    if t + 1 not in scene.frames or not scene.layout.flow_path(t, cam).is_file():
        return None
    seg_from_world = np.linalg.inv(sample.segment_to_world.double().numpy())
    nxt = scene.load_views([t + 1], seg_from_world, cameras=[cam])
    flow = scene.load_flow(t, cam, (sample.target.width, sample.target.height))
    return NextFrame(nxt.camtoworlds[0], nxt.images[0], flow, float(t + 1))


Renderer = Callable[[torch.Tensor, torch.Tensor, int, int, float], dict]
"""``render(c2w [4, 4] OpenCV camera-to-segment, K [3, 3], width, height, time) -> {"rgb": [H, W, 3], ...}``:
how a method renders another camera (the temporal error renders the view's camera at t+1)."""


def dynamic_metrics(sample: Sample, v: int, rgb: torch.Tensor, following: Optional[NextFrame],
                    render: Optional[Renderer]) -> dict[str, float]:
    """Region PSNR/SSIM (dynamic vs static pixels) and the temporal warping error on dynamic
    pixels, when the view has a dynamic mask (docs/metrics.md).

    ``temporal_warp_error`` (needs ``following`` and ``render``): with the residual of a pair along
    the ground-truth flow F (t -> t+1), ``r_X(p) = X_t(p) - X_{t+1}(p + F(p))``, it is
    ``mean_p |r_render(p) - r_gt(p)|_1`` over the dilated dynamic region (pixels whose target stays
    in the image): how far the render's change from t to t+1 is from the real footage's along the
    real motion. 0 = the same change; never negative. A render static or blurred in time scores
    ``mean |r_gt|`` (it is not rewarded, as the former ``E(render) - E(gt)`` rewarded it), and
    actors posed wrong in one frame but not the other score more; lighting changes of the footage
    cancel where the render reproduces them."""
    target = sample.target
    if target.dynamic_masks is None:
        return {}
    gt, dynamic = target.images[v].to(rgb.device), target.dynamic_masks[v].to(rgb.device)
    radius = max(1, round(DYNAMIC_DILATION * target.width))
    out = region_metrics(rgb, gt, dynamic, radius)
    if following is not None and render is not None and dynamic.any():
        rendered = render(following.c2w, target.intrinsics[v], target.width, target.height,
                          following.time)["rgb"].clamp(0, 1)
        region, flow = dilate(dynamic, radius), following.flow.to(rgb.device)
        error = warp_error(rgb, rendered.to(rgb.device), flow, region, reference=(gt, following.image.to(rgb.device)))
        if np.isfinite(error):
            out["temporal_warp_error"] = error
    return out


def sky_metrics(sample: Sample, v: int, rgb: torch.Tensor) -> dict[str, float]:
    """PSNR/SSIM on the view's sky pixels (``psnr_sky``, ``ssim_sky``; absent without sky pixels)
    and on the rest (``psnr_non_sky``, ``ssim_non_sky``), when the view has a sky mask."""
    if sample.target.sky_masks is None:
        return {}
    gt = sample.target.images[v].to(rgb.device)
    return masked_region_metrics(rgb, gt, sample.target.sky_masks[v].to(rgb.device), "sky", "non_sky")


def view_metrics(sample: Sample, v: int, outputs: dict[str, torch.Tensor], render: Optional[Renderer] = None,
                 following: Optional[NextFrame] = None) -> dict[str, float]:
    """Every metric of target ``v`` of ``sample`` rendered as ``outputs`` (rgb [H, W, 3], optional
    depth [H, W, 1] OpenCV z): image metrics, LiDAR depth error, region (dynamic/static, sky/rest)
    and temporal metrics. Any method's renders (ours, fine-tuned, baselines) are scored by this."""
    rgb = outputs["rgb"].clamp(0, 1)
    metrics = image_metrics(rgb, sample.target.images[v].to(rgb.device)[..., :3])
    return {**metrics, **view_extra_metrics(sample, v, outputs, render, following)}


def view_extra_metrics(sample: Sample, v: int, outputs: dict[str, torch.Tensor], render: Optional[Renderer] = None,
                       following: Optional[NextFrame] = None) -> dict[str, float]:
    """The metrics of :func:`view_metrics` beyond the whole-image ones."""
    rgb = outputs["rgb"].clamp(0, 1)
    out = lidar_depth_metrics(sample, v, outputs["depth"]) if outputs.get("depth") is not None else {}
    out.update(dynamic_metrics(sample, v, rgb, following, render))
    out.update(sky_metrics(sample, v, rgb))
    return out


DYNAMIC_DILATION = 0.01
"""Dynamic masks are dilated by this fraction of the image width (at least 1 px) before the
dynamic-region metrics, so the metric covers an actor's silhouette edge (drivestudio's practice)."""


def score_view(model: EVolSplatModel, sample: Sample, state: SharedState, v: int,
               timer: Optional[StageTimer] = None, following: Optional[NextFrame] = None) -> HeldOutView:
    """Render target ``v`` of ``sample`` from ``state`` and score it (optionally timed); with
    ``following`` (the camera one frame later) also the temporal error on dynamic pixels."""
    timed = timer if timer is not None else (lambda stage: nullcontext())
    target = sample.target.to(model.device)
    c2w, K = sample.target.camtoworlds[v], sample.target.intrinsics[v]  # host: no sync choosing sources
    with timed("render_ms"):
        out = model.render(state, c2w, K, target.width, target.height, time=float(target.frame_ids[v]))
    if timer is not None:
        background = model.predictor.predict_background(state)
        parts = [out["gaussians"]] + ([out["actors"]] if out["actors"] is not None else [])
        with timer("rasterize_ms"):  # the Gaussians exist now: rasterisation alone
            model.rasterize_gaussians(concat_gaussians(parts), background, c2w, K, target.width, target.height)
    metrics, images = model.get_image_metrics_and_images(out, {"image": target.images[v]})

    def render(c2w, K, width, height, time):
        return model.render(state, c2w.to(model.device), K.to(model.device), width, height, time=time)

    metrics.update(view_extra_metrics(sample, v, out, render, following))
    return HeldOutView(sample, v, out, metrics, images)


@torch.no_grad()
def held_out_views(model: EVolSplatModel, datamanager: EVolSplatDataManager, timer: Optional[StageTimer] = None,
                   progress: bool = False) -> Iterator[HeldOutView]:
    """Every held-out view of every eval scene of ``datamanager``'s dataset, scored, in dataset order.

    Segments are reconstructed from their own point clouds and source views only (states of
    segments already known to the model are reused).
    """
    dataset = datamanager.dataset
    if not dataset.eval_items:
        raise ValueError(f"no held-out frames in {dataset.config.data}: set dataset.eval_frame_interval > 0 "
                         "and at least one eval scene")
    timed: Callable[[str], ContextManager] = timer if timer is not None else (lambda stage: nullcontext())
    for i in tqdm(range(len(dataset.eval_items)), desc="held-out frames", disable=not progress):
        sample = dataset.eval_sample(i)
        if sample.key in model.segments:
            model.set_context(sample.key, sample.source)
        else:
            with timed("segment_setup_ms"):  # point cloud + anchor Gaussians, once per segment
                model.set_context(sample.key, sample.source, datamanager.point_cloud_for(sample))
        with timed("encode_ms"):
            state = model.encode(split_backward=False)
        for v in range(len(sample.target)):
            yield score_view(model, sample, state, v, timer, next_frame(dataset, sample, v))


VIEW_OUTPUTS = ("rgb", "gt-rgb", "depth", "accumulation")
"""Images written per held-out view (one folder each, like ``ns-render dataset``); ``composite``
(prediction | ground truth | error) is added on request."""


def view_images(view: HeldOutView, composite: bool = False) -> dict[str, torch.Tensor]:
    """The view's images by output name, [H, W, 3] in [0, 1]: the prediction, its ground truth, the
    colour-mapped depth (nerfstudio's turbo map, masked by accumulation), the accumulation, and,
    with ``composite``, the prediction | ground truth | error strip."""
    out = {"rgb": view.outputs["rgb"].clamp(0, 1), "gt-rgb": view.sample.target.images[view.view],
           "depth": view.images["depth"], "accumulation": view.images["accumulation"]}
    if composite:
        out["composite"] = view.images["img"]
    return out


def image_writer(folder: Path, composite: bool = False) -> Callable[[HeldOutView], None]:
    """An ``on_view`` for :func:`evaluate_held_out` that writes ``folder/{output}/{view.name}.png``
    for every output of :func:`view_images` (``ns-eval --render-output-path``)."""
    from PIL import Image

    def write(view: HeldOutView) -> None:
        for name, image in view_images(view, composite).items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            array = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
            Image.fromarray(array).save(folder / name / f"{view.name}.png")

    return write


def evaluate_held_out(model: EVolSplatModel, datamanager: EVolSplatDataManager,
                      on_view: Optional[Callable[[HeldOutView], None]] = None, timer: Optional[StageTimer] = None,
                      progress: bool = False, get_std: bool = False) -> dict:
    """Metrics of every held-out view (:func:`held_out_views`), per scene and mean (:func:`summarise`).

    ``on_view`` sees each scored view (grids, image files); ``timer`` collects stage timings. The
    model runs in eval mode (BatchNorm statistics frozen) and returns to its previous mode.
    """
    was_training = model.training
    model.eval()
    per_scene: dict[str, list[dict]] = defaultdict(list)
    try:
        for view in held_out_views(model, datamanager, timer, progress):
            per_scene[view.sample.key.scene].append(view.metrics)
            if on_view is not None:
                on_view(view)
    finally:
        model.train(was_training)
    return summarise(per_scene, get_std)


def summarise(per_scene: dict[str, list[dict]], get_std: bool = False) -> dict:
    """Mean (and std) of every metric per scene and over all views, plus which perceptual metrics
    were available (``lpips_available``, ``stlpips_available``, with a ``*_note`` saying why not)."""
    def agg(rows: list[dict]) -> dict:
        keys = sorted({k for r in rows for k in r if isinstance(r[k], (int, float))})
        out = {}
        for k in keys:
            vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
            out[k] = float(vals.mean())
            if get_std:
                out[f"{k}_std"] = float(vals.std())
        out["num_views"] = len(rows)
        return out

    all_rows = [r for rows in per_scene.values() for r in rows]
    result = agg(all_rows)
    result["per_scene"] = {s: agg(rows) for s, rows in per_scene.items()}
    result.update(perceptual_status())
    return result
