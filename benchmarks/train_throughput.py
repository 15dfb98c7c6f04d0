"""Training throughput of the evolsplat method: iterations/s, ms per phase, peak memory.

Runs real training iterations (EVolSplatTrainer.train_step) on a dataset and prints:
iterations/s, ms per phase (data, prepare, volume, projector, heads, render, backward, other),
peak GPU memory and Gaussians per segment. Default shape: 960x640 images, 3 source views,
4 target views (one camera, 3 source + 4 target keyframes).

    python benchmarks/train_throughput.py --data DIR [--iters 50] [--warmup 10] [--method evolsplat]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config
from evolsplat_ns.utils import timing


def build_trainer(args: argparse.Namespace):
    cfg = evolsplat_config() if args.method == "evolsplat" else evolsplat_lite_config()
    cfg.data = cfg.pipeline.datamanager.data = Path(args.data)
    ds = cfg.pipeline.datamanager.dataset
    ds.cameras = tuple(args.cameras)
    ds.num_source_keyframes, ds.num_target_keyframes = args.sources, args.targets
    ds.downscale = args.downscale
    ds.segment_length = args.segment_length
    ds.iters_per_segment = args.iters_per_segment
    cfg.pipeline.model.max_gaussians_per_segment = args.max_gaussians
    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.output_dir = Path(args.output_dir)
    cfg.vis = "tensorboard"
    cfg.use_mixed_precision = args.amp
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="evolsplat", choices=["evolsplat", "evolsplat-lite"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cameras", type=int, nargs="+", default=[0])
    p.add_argument("--sources", type=int, default=3, help="source keyframes (x cameras = source views)")
    p.add_argument("--targets", type=int, default=4, help="target keyframes (x cameras = target views)")
    p.add_argument("--downscale", type=float, default=1.0)
    p.add_argument("--segment-length", type=int, default=20)
    p.add_argument("--iters-per-segment", type=int, default=10)
    p.add_argument("--max-gaussians", type=int, default=0)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--output-dir", default="/tmp/evolsplat_bench")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    trainer = build_trainer(args)
    cuda = torch.cuda.is_available()
    for step in range(args.warmup):  # first visits build nodes (kNN), JIT kernels, caches
        trainer.train_step(step)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timing.enable()
    timing.reset()
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.iters):
        trainer.train_step(step)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    timing.enable(False)
    phases = {k: 1000 * v / args.iters for k, v in timing.totals().items()}
    phases["other"] = 1000 * wall / args.iters - sum(phases.values())
    segments = trainer.pipeline.model.segments
    sample = trainer.pipeline.model.context.sources
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "image": f"{sample.width}x{sample.height}",
        "source_views": args.sources * len(args.cameras),
        "target_views": args.targets * len(args.cameras),
        "iterations_per_s": args.iters / wall,
        "ms_per_iteration": 1000 * wall / args.iters,
        "ms_per_phase": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gaussians_per_segment": {str(k): len(segments.get(k).node) for k in segments.keys()},
        "amp": args.amp,
        "skipped_steps": dict(trainer.skipped_steps),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
