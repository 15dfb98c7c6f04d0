"""nerfstudio method registrations: ``evolsplat`` (full, GPU) and ``evolsplat-lite`` (CPU-sized), and
the same with the online stage-2 refiner of moving actors: ``evolsplat-stage2`` and
``evolsplat-stage2-lite`` (stage 2 from step 0, every other step; docs/stage2.md).

``evolsplat-lite`` defaults ``--machine.device-type`` to cuda when CUDA is available, else cpu;
any method asked for CUDA on a machine without it stops with one line naming
``--machine.device-type cpu`` (:func:`evolsplat_ns.engine.trainer.require_device`).

Registered through the entry-point group ``nerfstudio.method_configs`` in pyproject.toml. Every
field is settable on the ns-train command line, e.g.
``ns-train evolsplat --data DIR --pipeline.model.sparseConv-outdim 16 --gradient-clip-val 1.0``;
preset files in ``configs/`` are applied by ``evolsplat-train --preset FILE`` (see README).

nerfstudio imports this module when any ns-* command discovers its methods, which is where our
error handler goes in: a data or configuration error (:class:`evolsplat_ns.utils.errors.UserError`)
raised under ``ns-train``, ``ns-eval``, ``ns-viewer`` or ``ns-export`` prints its one-line message
(naming the file) instead of a traceback and exits 1; ``EVOLSPLAT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from evolsplat_ns._compat.process import prepare_process

prepare_process()  # every ns-* tool loads this module first: warnings filtered, ffmpeg on PATH

import torch
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.plugins.types import MethodSpecification

from evolsplat_ns.data.dataset import MultiSceneDatasetConfig
from evolsplat_ns.data.pointcloud.base import PointCloudGeneratorConfig
from evolsplat_ns.engine.datamanager import EVolSplatDataManagerConfig
from evolsplat_ns.engine.pipeline import EVolSplatPipelineConfig
from evolsplat_ns.engine.schedulers import FloatExponentialDecaySchedulerConfig
from evolsplat_ns.engine.trainer import AdamConfig, EVolSplatTrainerConfig
from evolsplat_ns.model.evolsplat_model import EVolSplatModelConfig
from evolsplat_ns.model.stage2.config import Stage2Config
from evolsplat_ns.utils.errors import install_excepthook
from evolsplat_ns.viewer.controls import SegmentControlsConfig

install_excepthook()


DEMO_DATA = Path("outputs/demo")
"""Where ``scripts/demo.sh`` writes its synthetic dataset (``data-WxH``): the default ``--data``."""


def _optimizers(lr: float, lr_final: float, steps: int) -> dict:
    return {"networks": {
        "optimizer": AdamConfig(lr=lr, eps=1e-15),
        "scheduler": FloatExponentialDecaySchedulerConfig(lr_final=lr_final, max_steps=steps),
    }}


def evolsplat_config() -> EVolSplatTrainerConfig:
    """The paper's design: full-resolution multi-scene training on a GPU."""
    steps = 30000
    return EVolSplatTrainerConfig(
        method_name="evolsplat",
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_eval_all_images=10000,
        steps_per_save=5000,
        max_num_iterations=steps,
        mixed_precision=False,
        pipeline=EVolSplatPipelineConfig(
            datamanager=EVolSplatDataManagerConfig(dataset=MultiSceneDatasetConfig(data=DEMO_DATA / "data-960x640")),
            model=EVolSplatModelConfig(),
            viewer_controls=SegmentControlsConfig(),
        ),
        optimizers=_optimizers(1e-3, 1e-4, steps),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, camera_frustum_scale=1.0),  # street scale (m)
        vis="viewer",
    )


def evolsplat_lite_config() -> EVolSplatTrainerConfig:
    """CPU-sized settings for the demo and tests: small images, few Gaussians, short schedule."""
    steps = 500
    cfg = evolsplat_config()
    cfg.method_name = "evolsplat-lite"
    cfg.max_num_iterations = steps
    cfg.steps_per_save = 100
    cfg.steps_per_eval_batch = 100
    cfg.steps_per_eval_image = 100
    cfg.steps_per_eval_all_images = 1_000_000
    cfg.optimizers = _optimizers(2e-3, 2e-4, steps)
    cfg.pipeline.model = replace(cfg.pipeline.model, sparseConv_outdim=8, num_neighbour_select=3,
                                 voxel_size=0.2, max_gaussians_per_segment=6000, max_points_per_actor=1000,
                                 entropy_loss=0.0)
    cfg.pipeline.datamanager.dataset = MultiSceneDatasetConfig(
        segment_length=12, segment_stride=6, num_source_keyframes=3, num_target_keyframes=1,
        iters_per_segment=4, pointcloud=PointCloudGeneratorConfig(voxel_size=0.15), data=DEMO_DATA / "data-192x128")
    cfg.vis = "tensorboard"
    # CPU-sized: runs where it is, with no flag; a GPU is used when there is one.
    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def _with_stage2(cfg: EVolSplatTrainerConfig, name: str, stage2: Stage2Config) -> EVolSplatTrainerConfig:
    """``cfg`` with stage 2 on: the model's refiner and its own ``stage2`` optimizer group (Adam at
    ``stage2_learning_rate``, the same exponential decay shape as stage 1)."""
    cfg.method_name = name
    cfg.pipeline.model = replace(cfg.pipeline.model, stage2=stage2)
    networks = cfg.optimizers["networks"]
    ratio = networks["scheduler"].lr_final / networks["optimizer"].lr
    cfg.optimizers["stage2"] = {
        "optimizer": AdamConfig(lr=stage2.stage2_learning_rate, eps=1e-15),
        "scheduler": FloatExponentialDecaySchedulerConfig(lr_final=stage2.stage2_learning_rate * ratio,
                                                          max_steps=cfg.max_num_iterations),
    }
    return cfg


def evolsplat_stage2_config() -> EVolSplatTrainerConfig:
    """``evolsplat`` + the online stage-2 refiner with the user guide's defaults (epoch 10, every 5 steps)."""
    return _with_stage2(evolsplat_config(), "evolsplat-stage2", Stage2Config(enabled=True))


def evolsplat_stage2_lite_config() -> EVolSplatTrainerConfig:
    """``evolsplat-lite`` + stage 2 from step 0, every other step, with CPU-sized heads."""
    return _with_stage2(evolsplat_lite_config(), "evolsplat-stage2-lite", Stage2Config(
        enabled=True, start_step=0, stage2_frequency=2, stage2_learning_rate=1e-4, gaussian_feature_dim=32,
        pose_feature_dim=32, max_points_per_object=512))


evolsplat = MethodSpecification(config=evolsplat_config(), description="EVolSplat: feed-forward 3DGS of driving scenes")
evolsplat_lite = MethodSpecification(config=evolsplat_lite_config(),
                                     description="EVolSplat with CPU-sized settings (demo, tests)")
evolsplat_stage2 = MethodSpecification(config=evolsplat_stage2_config(),
                                       description="EVolSplat with the online stage-2 refiner of moving actors")
evolsplat_stage2_lite = MethodSpecification(config=evolsplat_stage2_lite_config(),
                                            description="EVolSplat + stage 2, CPU-sized (stage 2 from step 0, every 2nd step)")
