"""Moving actors vs the static-only model on synthetic streets with moving cars (same seed, steps).

Trains ``evolsplat-lite`` twice on the same generated data, once with actor nodes
(``enable_actors=True``) and once without, then runs the one held-out evaluation loop on the held-out
scene and prints whole-image, dynamic-region and static-region PSNR/SSIM and the temporal
(flow-warping) error on dynamic pixels, as JSON and a table. Definitions: docs/metrics.md.

    python benchmarks/actors_quality.py --out /tmp/actors --steps 300 [--width 96 --height 64]
    python benchmarks/actors_quality.py --out /tmp/actors --steps 2000 --width 960 --height 640 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def train_and_evaluate(data: Path, out: Path, actors: bool, steps: int, device: str, method: str) -> dict:
    from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config
    from evolsplat_ns.utils import timing

    torch.manual_seed(0)
    cfg = evolsplat_lite_config() if method == "lite" else evolsplat_config()
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.pipeline.datamanager.dataset.preload = False
    cfg.pipeline.model.enable_actors = actors
    cfg.output_dir, cfg.timestamp, cfg.vis = out, "actors" if actors else "static", "tensorboard"
    cfg.machine.device_type = device
    cfg.max_num_iterations = steps
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    for step in range(min(10, steps)):  # warm-up (CUDA kernels, caches): not timed
        trainer.train_step(step)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(min(10, steps), steps - 20):
        trainer.train_step(step)
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    timing.enable(True)  # the last 20 steps with phase timers (they synchronise CUDA at phase edges)
    timing.reset()
    for step in range(max(min(10, steps), steps - 20), steps):
        trainer.train_step(step)
    phases = {k: round(1e3 * v / 20, 2) for k, v in sorted(timing.totals().items(), key=lambda kv: -kv[1])}
    timing.enable(False)
    timed_steps = max(1, steps - 20 - min(10, steps))
    store = trainer.pipeline.model.segments
    num_actors = max((store.get(k).actors.num_actors for k in store.keys() if store.get(k).actors is not None), default=0)
    metrics = trainer.pipeline.get_average_eval_image_metrics()
    trainer.pipeline.datamanager.dataset.close()
    keys = ("psnr", "ssim", "psnr_dynamic", "ssim_dynamic", "psnr_static", "ssim_static", "temporal_warp_error",
            "num_views")
    return {**{k: metrics[k] for k in keys if k in metrics}, "train_s": train_s,
            "ms_per_step": 1e3 * train_s / timed_steps, "ms_per_phase": phases, "max_actors_per_segment": num_actors,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--moving-cars", type=int, default=4)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", choices=("lite", "full"), default="lite",
                        help="evolsplat-lite (CPU-sized) or the full evolsplat settings")
    parser.add_argument("--data", type=Path, default=None, help="existing dataset instead of generating one")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # spconv on CPU is only correct single-threaded

    data = args.data or args.out / "data"
    if not data.is_dir():
        from evolsplat_ns.data.synth import SynthConfig, generate_dataset  # needs open3d

        generate_dataset(SynthConfig(scenes=args.scenes, frames=args.frames, cameras=3, width=args.width,
                                     height=args.height, lidar_beams=32, lidar_azimuths=512,
                                     moving_cars=args.moving_cars, seed=0), data)
    rows = {name: train_and_evaluate(data, args.out / "runs", name == "actors", args.steps, args.device, args.method)
            for name in ("static", "actors")}
    print(json.dumps(rows, indent=1))
    (args.out / "actors_quality.json").write_text(json.dumps(rows, indent=1))
    cols = ("psnr", "psnr_dynamic", "psnr_static", "ssim_dynamic", "temporal_warp_error", "ms_per_step",
            "max_actors_per_segment")
    print("| model | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r.get(c, float('nan')):.4g}" for c in cols) + " |")


if __name__ == "__main__":
    main()
