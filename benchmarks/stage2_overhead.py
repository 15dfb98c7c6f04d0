"""Stage-2 overhead: stage-1 training it/s with stage 2 off vs on, per preset and frequency, and peak memory.

For each preset (``standard`` = configs/stage2_online.yaml, ``memory`` = configs/stage2_memory.yaml,
``minimal`` = configs/stage2_minimal.yaml) and each frequency (default 5, 10, 1), the stage-2
method is built from the preset with stage 2 running from step 0 at that frequency, trained
``--warmup`` steps (first visits: nodes, the processor's once-per-segment pass, kernels), then
``--steps`` timed steps (CUDA-synchronised at both ends; peak memory of the timed steps). The
baseline is the same method without stage 2 (``evolsplat``), same data, seed and steps.
Overhead = step time on / step time off - 1. Prints a table and the JSON (``--json FILE`` too).

Generated data (moving cars with box noise) is written to ``--out/data`` when absent.

    python benchmarks/stage2_overhead.py --out /tmp/s2o --width 96 --height 64 --lite --steps 6 --warmup 2
    python benchmarks/stage2_overhead.py --out /tmp/s2o --width 960 --height 640 --steps 40 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"standard": "stage2_online.yaml", "memory": "stage2_memory.yaml", "minimal": "stage2_minimal.yaml"}


def _config(args: argparse.Namespace, preset: str | None, frequency: int):
    from dataclasses import replace

    from evolsplat_ns import method_configs as mc
    from evolsplat_ns.presets import apply_overrides, load_preset

    if preset is None:
        cfg = mc.evolsplat_lite_config() if args.lite else mc.evolsplat_config()
    else:
        base = mc.evolsplat_stage2_lite_config() if args.lite else mc.evolsplat_stage2_config()
        _, overrides = load_preset(ROOT / "configs" / PRESETS[preset])  # stage-2 keys and its optimizer group
        cfg = apply_overrides(base, overrides, str(PRESETS[preset]))
        cfg.pipeline.model.stage2 = replace(cfg.pipeline.model.stage2, start_step=0, stage2_frequency=frequency)
    cfg.data = cfg.pipeline.datamanager.data = args.out / "data"
    cfg.pipeline.datamanager.dataset.preload = False
    cfg.machine.device_type = args.device
    cfg.output_dir, cfg.vis = args.out / "runs", "tensorboard"
    cfg.timestamp = f"{preset or 'off'}-f{frequency}"
    cfg.max_num_iterations = args.warmup + args.steps
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10**9
    cfg.steps_per_save = 10**9
    return cfg


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, preset: str | None, frequency: int) -> dict:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = _config(args, preset, frequency).setup(local_rank=0, world_size=1)
    trainer.setup()
    for step in range(args.warmup):
        trainer.train_step(step)
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        trainer.train_step(step)
    _sync(args.device)
    seconds = time.perf_counter() - start
    out = {"it_per_s": args.steps / seconds, "ms_per_step": 1e3 * seconds / args.steps,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}
    controller = getattr(trainer.pipeline, "stage2_controller", None)
    if controller is not None:
        s = controller.get_statistics()
        out.update(stage2_runs=s["runs"], stage2_ms_per_run=1e3 * s["time_avg_s"], stage2_peak_mem_mb=s["peak_mem_mb_max"],
                   objects=s["objects_avg"], **{k: s[k] for k in s if k.startswith("time_ratio_")})
    trainer.pipeline.datamanager.dataset.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--frequencies", nargs="+", type=int, default=[5, 10, 1])
    p.add_argument("--lite", action="store_true", help="the CPU-sized lite methods (a CPU check, not the figure)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    if not (a.out / "data").exists():
        generate_dataset(SynthConfig(scenes=a.scenes, frames=a.frames, cameras=3, width=a.width, height=a.height,
                                     moving_cars=4, seed=0, box_noise_trans=0.3, box_noise_rot=3.0), a.out / "data")
    results = {"off": measure(a, None, 0)}
    for preset in a.presets:
        for f in a.frequencies:
            r = measure(a, preset, f)
            r["overhead"] = results["off"]["ms_per_step"] and r["ms_per_step"] / results["off"]["ms_per_step"] - 1
            results[f"{preset}/f{f}"] = r
    print(json.dumps(results, indent=2))
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=2))
    print(f"{'run':<16}{'it/s':>8}{'ms/step':>10}{'overhead':>10}{'peak GB':>9}{'s2 ms/run':>11}")
    for name, r in results.items():
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "n/a"
        over = f"{100 * r['overhead']:+.1f}%" if "overhead" in r else "-"
        s2 = f"{r['stage2_ms_per_run']:.1f}" if "stage2_ms_per_run" in r else "-"
        print(f"{name:<16}{r['it_per_s']:>8.2f}{r['ms_per_step']:>10.1f}{over:>10}{peak:>9}{s2:>11}")


if __name__ == "__main__":
    main()
