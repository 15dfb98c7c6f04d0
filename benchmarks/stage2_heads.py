"""Stage-2 refine heads alone: every refined object in one padded call (``Stage2Refiner.forward``)
vs one call per object (``Stage2Refiner.forward_reference``), forward and forward + backward.

Builds ``--objects`` actors (default: the preset's ``max_objects_per_frame``) with point counts
spread evenly from ``--points`` / ``--spread`` to ``--points`` (default: the preset's
``max_points_per_object``, the point budget, so the largest object sets the padding), for each
``--group-ratios`` value (``refiner.GROUP_RATIO``: the Gaussian head's size classes; inf = one
call for all objects; the pose head always runs once), ``--frames`` frames,
the heads at a preset's sizes (``standard`` = configs/stage2_online.yaml, ``memory``, ``minimal``),
their output layers moved off zero so nothing is trivially zero. Each figure is the minimum over
``--repeats`` timed repetitions after ``--warmup``: wall time, CUDA-synchronised at both ends, on
CUDA; process CPU time on the CPU (use ``--threads 1`` there: a shared CPU's wall time is noise); the
max |batched - per-object| of the outputs is printed as a check.

    python benchmarks/stage2_heads.py --device cpu --threads 1 --objects 10 --points 256 --repeats 10
    python benchmarks/stage2_heads.py --device cuda --presets standard memory minimal
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"standard": "stage2_online.yaml", "memory": "stage2_memory.yaml", "minimal": "stage2_minimal.yaml"}


def _config(preset: str, points: int | None, objects: int | None):
    from dataclasses import replace

    from evolsplat_ns.model.stage2.config import Stage2Config
    from evolsplat_ns.presets import load_preset

    _, overrides = load_preset(ROOT / "configs" / PRESETS[preset])
    keys = overrides.get("pipeline", {}).get("model", {}).get("stage2", {})
    heads = ("gaussian_feature_dim", "gaussian_num_layers", "gaussian_num_heads", "pose_feature_dim", "pose_num_layers",
             "stage2_memory_efficient", "input_gaussian_dim", "max_points_per_object", "max_objects_per_frame")
    config = Stage2Config(enabled=True, **{k: keys[k] for k in heads if k in keys})  # what the heads' cost depends on
    return replace(config, max_points_per_object=points or config.max_points_per_object,
                   max_objects_per_frame=objects or config.max_objects_per_frame)


def _actors(objects: int, points: int, frames: int, device: str, spread: float):
    from evolsplat_ns.model.actors import ActorGaussians, ActorNodes
    from evolsplat_ns.model.stage2.se3 import se3_exp

    g = torch.Generator().manual_seed(0)
    d = torch.device(device)
    counts = torch.linspace(points / spread, points, objects).round().long().clamp(min=1).tolist()
    actor = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    N = actor.numel()
    means = torch.rand(N, 3, generator=g) - 0.5
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    gauss = ActorGaussians(means, quats, torch.rand(N, 3, generator=g) * 0.1 + 0.01,
                           torch.rand(N, generator=g) * 0.8 + 0.1, torch.randn(N, 1, 3, generator=g), actor)
    poses = se3_exp(torch.randn(objects * frames, 6, generator=g) * 0.3).reshape(objects, frames, 4, 4)
    valid = torch.ones(objects, frames, dtype=torch.bool)
    sizes = torch.tensor([[4.5, 1.9, 1.6]]).repeat(objects, 1)
    gauss = ActorGaussians(*(t.to(d) for t in (gauss.means, gauss.quats, gauss.scales, gauss.opacities, gauss.sh,
                                               gauss.actor)))
    nodes = ActorNodes(gauss.means, gauss.sh[:, 0], gauss.scales.log(), gauss.actor, torch.arange(frames, device=d),
                       poses.to(d), valid.to(d), sizes.to(d), tuple(str(k) for k in range(objects)))
    return gauss, nodes, counts


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, warmup: int, repeats: int) -> float:
    """Min seconds of ``fn`` over ``repeats``: wall clock (CUDA-synchronised) on CUDA; on CPU the
    process's CPU time (with ``--threads 1`` the work itself, robust to other jobs on a shared CPU)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        best = min(best, clock() - start)
    return best


def measure(args: argparse.Namespace, preset: str, ratio: float) -> dict:
    from evolsplat_ns.model.stage2 import refiner as R

    R.GROUP_RATIO = ratio
    torch.manual_seed(0)
    config = _config(preset, args.points, args.objects)
    objects, points = config.max_objects_per_frame, config.max_points_per_object
    refiner = R.Stage2Refiner(config).to(args.device)
    for head in (refiner.gaussian_head, refiner.pose_head):
        torch.nn.init.normal_(head.out.weight, std=0.1)
    gauss, nodes, counts = _actors(objects, points, args.frames, args.device, args.spread)
    plan = refiner.plan(nodes)
    paths = {"batched": refiner.forward, "per_object": refiner.forward_reference}

    def forward(path):
        with torch.no_grad():
            return path(gauss, nodes)

    def forward_backward(path):
        refiner.zero_grad(set_to_none=True)
        out = path(gauss, nodes)
        (out.delta.square().sum() + out.xi.square().sum()).backward()

    a, b = forward(paths["batched"]), forward(paths["per_object"])
    result = {"preset": preset, "group_ratio": ratio, "gaussian_head_calls": len(plan.groups),
              "objects": len(plan.rows), "points": counts, "padded_points": plan.padded_points,
              "checkpointed": refiner._checkpoint(plan), "feature_dim": config.gaussian_feature_dim,
              "max_abs_diff_delta": float((a.delta - b.delta).abs().max()),
              "max_abs_diff_xi": float((a.xi - b.xi).abs().max())}
    cuda = args.device.startswith("cuda")
    for name, path in paths.items():
        result[f"{name}_forward_ms"] = 1e3 * _time(lambda: forward(path), args.device, args.warmup, args.repeats)
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        result[f"{name}_fwd_bwd_ms"] = 1e3 * _time(lambda: forward_backward(path), args.device, args.warmup,
                                                   args.repeats)
        # the forward + backward's peak above what was allocated before (masked attention must stay
        # on a fused kernel: the math fallback would keep [B, heads, P, P] weights)
        result[f"{name}_fwd_bwd_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--objects", type=int, default=None, help="objects (default: the preset's max_objects_per_frame)")
    p.add_argument("--points", type=int, default=None,
                   help="point budget = the largest object's points (default: the preset's max_points_per_object)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--presets", nargs="+", default=["standard"], choices=list(PRESETS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group-ratios", nargs="+", type=float, default=[4.0, float("inf")],
                   help="refiner.GROUP_RATIO values to compare (inf: the Gaussian head in one call)")
    p.add_argument("--spread", type=float, default=4.0,
                   help="object sizes spread evenly from points / spread to points (1: all the same)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    results = [measure(a, preset, ratio) for preset in a.presets for ratio in a.group_ratios]
    print(json.dumps(results, indent=2))
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=2))
    print(f"{'preset':<10}{'ratio':>6}{'calls':>6}{'objects':>8}{'padded':>8}{'fwd batched':>13}{'fwd per-obj':>13}"
          f"{'f+b batched':>13}{'f+b per-obj':>13}{'max diff':>10}   (ms, min of {a.repeats}; {a.device}"
          f"{', CPU time' if a.device == 'cpu' else ''})")
    mb = lambda r, k: f"{r[k]:.0f}" if r.get(k) is not None else "n/a"  # noqa: E731
    for r in results:
        diff = max(r["max_abs_diff_delta"], r["max_abs_diff_xi"])
        print(f"{r['preset']:<10}{r['group_ratio']:>6.3g}{r['gaussian_head_calls']:>6}{r['objects']:>8}"
              f"{r['padded_points']:>8}{r['batched_forward_ms']:>13.1f}{r['per_object_forward_ms']:>13.1f}"
              f"{r['batched_fwd_bwd_ms']:>13.1f}{r['per_object_fwd_bwd_ms']:>13.1f}"
              f"{diff:>10.1e}   peak MB f+b {mb(r, 'batched_fwd_bwd_peak_mb')} / {mb(r, 'per_object_fwd_bwd_peak_mb')}")


if __name__ == "__main__":
    main()
