"""The sparse volume per training step, ``volume_from`` "current" vs "anchors": ms and spconv pair builds.

With "current" the volume is voxelised from the anchors moved by the cached offsets, which change
every step, so the voxel grid and spconv's index pairs (7 builds: 4 SubM + 3 strided layers) are
rebuilt every step. With "anchors" they depend on the segment alone and the segment's
:class:`~evolsplat_ns.model.volume_cache.VolumeIndexCache` serves them on every step after a
segment's first (a step that meets another segment rebuilds them: ``--iters-per-segment``).

Each run: ``--warmup`` untimed steps, then ``--steps`` steps, each with the phase timers on (phase
``volume``: build + sampling, CUDA-synchronised at its ends) and spconv's pair builds counted.
Same generated data and seed as ``stage2_overhead.py`` / ``op_count.py`` (written to ``--out/data``
when absent). Prints the JSON (``--json FILE`` too) and a table.

    python benchmarks/volume_cache.py --out /tmp/volcache --width 96 --height 64 --lite --device cpu \\
        --steps 8 --warmup 2
    python benchmarks/volume_cache.py --out /tmp/volcache --width 960 --height 640 --steps 20 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import add_synth_args, set_field, synth_dataset  # noqa: E402
from stage2_overhead import _config  # noqa: E402

from evolsplat_ns.model.volume_cache import counted_pair_builds  # noqa: E402
from evolsplat_ns.utils import timing  # noqa: E402

MODES = ("current", "anchors")


def _trainer(args: argparse.Namespace, volume_from: str):
    """A set-up trainer of the (lite) method with ``volume_from``, seeded like the other benchmarks."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    cfg = _config(args, None, 1)
    cfg.timestamp = f"volume-{volume_from}"
    cfg.pipeline.model.volume_from = volume_from
    cfg.pipeline.datamanager.dataset.iters_per_segment = args.iters_per_segment
    for flag in args.set:
        set_field(cfg, flag)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def measure(args: argparse.Namespace, volume_from: str) -> dict:
    """Per step: volume-phase ms, spconv pair builds and step ms of one run."""
    trainer = _trainer(args, volume_from)
    for step in range(args.warmup):
        trainer.train_step(step)
    volume_ms, builds, step_ms = [], [], []
    timing.enable()
    try:
        for step in range(args.warmup, args.warmup + args.steps):
            timing.reset()
            start = time.perf_counter()
            with counted_pair_builds() as count:
                trainer.train_step(step)
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_ms.append(1e3 * (time.perf_counter() - start))
            volume_ms.append(1e3 * timing.totals().get("volume", 0.0))
            builds.append(count[0])
    finally:
        timing.enable(False)
    segment = trainer.pipeline.model.context.segment
    voxels = segment.volume_cache.grid.keys.shape[0] if segment.volume_cache.grid is not None else 0
    trainer.pipeline.datamanager.dataset.close()
    return {"volume_from": volume_from, "gaussians": len(segment.node), "voxels": voxels,
            "cache_mb": segment.volume_cache.nbytes() / 2**20, "volume_ms_per_step": float(np.mean(volume_ms)),
            "volume_ms_median": float(np.median(volume_ms)), "pair_builds_per_step": float(np.mean(builds)),
            "cache_hit_steps": sum(b == 0 for b in builds), "steps": args.steps,
            "step_ms": float(np.mean(step_ms)), "volume_ms": volume_ms, "pair_builds": builds}


def table(results: list[dict]) -> str:
    """One row per run: segment size, volume ms (mean, median), pair builds per step, steps served by the cache."""
    rows = [f"{'volume_from':<12}{'Gaussians':>10}{'voxels':>8}{'volume ms':>11}{'median':>9}{'pair builds':>13}"
            f"{'hit steps':>11}{'step ms':>10}"]
    for r in results:
        rows.append(f"{r['volume_from']:<12}{r['gaussians']:>10}{r['voxels']:>8}{r['volume_ms_per_step']:>11.1f}{r['volume_ms_median']:>9.1f}"
                    f"{r['pair_builds_per_step']:>13.1f}{r['cache_hit_steps']:>6}/{r['steps']:<4}{r['step_ms']:>10.0f}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_synth_args(p, width=96, height=64, moving_cars=4, device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="volume_from values run")
    p.add_argument("--lite", action="store_true", help="the lite method (evolsplat-lite)")
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters-per-segment", type=int, default=10, help="steps on a segment before the next")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any config field, e.g. pipeline.model.max_gaussians_per_segment=20000")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    synth_dataset(a)
    results = [measure(a, mode) for mode in a.modes]
    print(json.dumps(results, indent=1))
    print(table(results))
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
