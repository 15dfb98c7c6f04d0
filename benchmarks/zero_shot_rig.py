"""Zero-shot on a rig the model never trained on: train evolsplat-lite on 3-camera scenes, then run
evolsplat-infer on a generated 3-frame, 6-camera (ring, rear included) scene; prints metrics per
camera, trained vs untrained weights (the untrained run is the baseline, never the result).

    python benchmarks/zero_shot_rig.py --out /tmp/zero_shot_rig [--steps 200] [--width 96 --height 64]

Writes OUT/train (3 scenes x 20 frames x 3 cameras), OUT/new (1 scene x 3 frames x 6 cameras at 1 Hz),
the run under OUT/run, and evolsplat-infer's outputs (metrics.json, grid.png) under OUT/infer_{trained,untrained}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def train(data: Path, out: Path, steps: int) -> Path:
    """An evolsplat-lite run of ``steps`` iterations on ``data`` (saved like ns-train); its config.yml."""
    from evolsplat_ns.method_configs import evolsplat_lite_config

    torch.manual_seed(0)
    cfg = evolsplat_lite_config()  # CPU without CUDA by default (issue 12)
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.output_dir, cfg.experiment_name, cfg.timestamp, cfg.vis = out, "rig", "run", "tensorboard"
    cfg.max_num_iterations = steps
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    start = time.perf_counter()
    for step in range(steps):
        trainer.train_step(step)  # with the callbacks (offset commit), as ns-train runs it
    trainer.save_checkpoint(steps - 1)
    trainer.config.save_config()
    trainer.pipeline.datamanager.dataset.close()
    print(f"trained {steps} steps on {cfg.machine.device_type} in {time.perf_counter() - start:.0f} s")
    return out / "rig" / "evolsplat-lite" / "run" / "config.yml"


def main() -> None:
    from evolsplat_ns.cli.infer import main as infer
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--height", type=int, default=64)
    args = p.parse_args()
    size = dict(width=args.width, height=args.height, lidar_beams=24, lidar_azimuths=512)
    if not (args.out / "train").exists():
        generate_dataset(SynthConfig(scenes=3, frames=20, cameras=3, seed=0, **size), args.out / "train")
    if not (args.out / "new").exists():
        generate_dataset(SynthConfig(scenes=1, frames=3, cameras=6, fps=1.0, seed=100, **size), args.out / "new")
    config = train(args.out / "train", args.out / "run", args.steps)
    reports = {}
    for name, extra in (("trained", []), ("untrained", ["--untrained"])):
        reports[name] = infer(["--load-config", str(config), "--data", str(args.out / "new"), "--output-dir",
                               str(args.out / f"infer_{name}"), "--video-frames", "0", "--no-progress",
                               "--max-grid-rows", "6", "--overwrite", *extra])
    print(f"\nzero-shot, 3-frame 6-camera scene, model trained {args.steps} steps on 3-camera scenes "
          f"({args.width}x{args.height}):")
    print(f"{'camera':<14} {'PSNR trained':>13} {'PSNR untrained':>15} {'SSIM trained':>13} {'SSIM untrained':>15}")
    for cam, m in reports["trained"]["per_camera"].items():
        u = reports["untrained"]["per_camera"][cam]
        print(f"{cam:<14} {m['psnr']:>13.2f} {u['psnr']:>15.2f} {m['ssim']:>13.3f} {u['ssim']:>15.3f}")
    print(f"{'mean':<14} {reports['trained']['psnr']:>13.2f} {reports['untrained']['psnr']:>15.2f} "
          f"{reports['trained']['ssim']:>13.3f} {reports['untrained']['ssim']:>15.3f}")
    print("selection:", json.dumps(reports["trained"]["selection"]["per_scene"]["000"]["per_segment"]))


if __name__ == "__main__":
    main()
