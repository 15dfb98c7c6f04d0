"""Training throughput of the evolsplat method: it/s, ms per phase, GPU busy, launches, memory.

Runs real training iterations (``EVolSplatTrainer.train_step``) on a dataset in three passes after
``--warmup`` steps (first visits build nodes (kNN), JIT kernels, caches):

1. timed: ``--iters`` steps with nothing added -> iterations/s, ms per iteration, peak memory;
2. phases: ``--phase-iters`` steps with the phase timers on (they synchronise CUDA at every phase
   boundary, so their sum exceeds pass 1's step time) -> ms per phase (data, prepare, volume,
   projector, heads, render, backward, other);
3. profiled: ``--profile-iters`` steps under torch.profiler -> per step: kernel launches, GPU busy
   time (union of kernel/copy intervals), host syncs and the busy fraction = busy time / pass 1's
   step time (kernel time over wall time), plus the top kernels.

Prints a table and the JSON (``--json FILE`` also writes it). Default shape: 960x640 images, one
camera, 3 source + 4 target keyframes. See ``benchmarks/bench_setup.py`` (``--generator``,
``--pixel-stride``, ``--pc-voxel-size``, ``--max-gaussians``) for reaching ~1M Gaussians per segment
on generated data, e.g.:

    evolsplat-synth --out /tmp/synth --scenes 2 --frames 12 --cameras 1 --width 960 --height 640
    python benchmarks/train_throughput.py --data /tmp/synth --generator depth --pixel-stride 4 \\
        --max-gaussians 100000                                  # ~100k Gaussians per segment
    python benchmarks/train_throughput.py --data /tmp/synth --generator depth --pixel-stride 1 \\
        --pc-voxel-size 0.02 --max-gaussians 1000000 --pc-device cuda   # 1M Gaussians per segment
    ... --amp bf16                                              # mixed precision (heads in bf16)
    ... --tf32 on                                               # TF32 tensor cores for the fp32 matrix products
    ... --set pipeline.model.volume_from=anchors               # sparse volume from the anchors: cached index pairs
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench_setup import add_pointcloud_args, apply_pointcloud_args, set_field
from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config
from evolsplat_ns.utils import timing

_LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                 "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
_SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def add_trainer_args(p: argparse.ArgumentParser) -> None:
    """The flags :func:`build_trainer` reads (data, method, shape, timed steps), shared by the benchmarks."""
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="evolsplat", choices=["evolsplat", "evolsplat-lite"])
    p.add_argument("--iters", type=int, default=50, help="steps of the timed pass")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cameras", type=int, nargs="+", default=[0])
    p.add_argument("--sources", type=int, default=3, help="source keyframes (x cameras = source views)")
    p.add_argument("--targets", type=int, default=4, help="target keyframes (x cameras = target views)")
    p.add_argument("--downscale", type=float, default=1.0)
    p.add_argument("--segment-length", type=int, default=20)
    p.add_argument("--iters-per-segment", type=int, default=10)
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=("bf16", "fp16"),
                   help="mixed precision (bare --amp: bf16)")
    p.add_argument("--tf32", choices=("on", "off"), default="off",
                   help="TF32 tensor cores for fp32 matrix products (the trainer's tf32_matmul; default off)")
    p.add_argument("--output-dir", default="/tmp/evolsplat_bench")
    p.add_argument("--seed", type=int, default=42, help="seeds the network initialisation")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any config field, e.g. pipeline.model.background_source=dome")
    add_pointcloud_args(p)


def build_trainer(args: argparse.Namespace):
    # Same initial weights in every run (ns-train seeds through machine.seed; a bare Trainer does
    # not), so held-out PSNRs of runs with equal steps are comparable.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = evolsplat_config() if args.method == "evolsplat" else evolsplat_lite_config()
    cfg.data = cfg.pipeline.datamanager.data = Path(args.data)
    ds = cfg.pipeline.datamanager.dataset
    ds.cameras = tuple(args.cameras)
    ds.num_source_keyframes, ds.num_target_keyframes = args.sources, args.targets
    ds.downscale = args.downscale
    ds.segment_length = args.segment_length
    ds.iters_per_segment = args.iters_per_segment
    apply_pointcloud_args(cfg, args)
    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.output_dir = Path(args.output_dir)
    cfg.vis = "tensorboard"
    cfg.use_mixed_precision = args.amp is not None
    cfg.tf32_matmul = args.tf32 == "on"
    if args.amp is not None and hasattr(cfg, "mixed_precision_dtype"):
        cfg.mixed_precision_dtype = {"bf16": "bfloat16", "fp16": "float16"}[args.amp]
    for flag in args.set:
        set_field(cfg, flag)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_pass(trainer, first: int, iters: int) -> float:
    """Wall seconds of ``iters`` steps from step ``first`` (CUDA synchronised at both ends)."""
    _sync()
    t0 = time.perf_counter()
    for step in range(first, first + iters):
        trainer.train_step(step)
    _sync()
    return time.perf_counter() - t0


def phase_pass(trainer, first: int, iters: int) -> dict[str, float]:
    """ms per step of each timed phase (timers synchronise CUDA at phase boundaries)."""
    timing.enable()
    timing.reset()
    wall = timed_pass(trainer, first, iters)
    timing.enable(False)
    phases = {k: 1000 * v / iters for k, v in timing.totals().items()}
    phases["other"] = 1000 * wall / iters - sum(phases.values())
    return dict(sorted(phases.items(), key=lambda kv: -kv[1]))


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end] intervals as sorted disjoint intervals."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals."""
    return sum(b - a for a, b in _merged(intervals))


def device_events(events) -> list:
    """The profiler's kernels and copies: device-side events less the GPU shadows of
    ``record_function`` ranges (phases, ``Optimizer.step``), which span host time, not GPU work."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith(("phase:", "Optimizer."))]


def idle_by_phase(events, iters: int, top: int = 8) -> dict[str, float]:
    """GPU idle ms per step, by the phase (``utils.timing.phase``) the host was in meanwhile.

    Idle = the gaps between the union of device intervals, from the first device event to the
    last; each gap's time goes to the innermost ``phase:<name>`` range covering it ("(none)" for
    host work outside any phase: the optimizer step, the trainer's bookkeeping). It says which
    phase's host work the GPU waited on: where launches, Python or syncs are exposed.
    """
    from torch.autograd import DeviceType

    try:
        from evolsplat_ns.utils.timing import PHASE_PREFIX
    except ImportError:  # code from before phases were profiler ranges: every gap is "(none)"
        PHASE_PREFIX = "phase:"
    busy = _merged([(e.time_range.start, e.time_range.end) for e in device_events(events)])
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]
    phases = sorted(((e.time_range.start, e.time_range.end, e.name[len(PHASE_PREFIX):]) for e in events
                     if e.device_type == DeviceType.CPU and e.name.startswith(PHASE_PREFIX)))
    idle: Counter = Counter()
    starts = [p[0] for p in phases]
    for g0, g1 in gaps:
        # Cut the gap at every phase boundary inside it; each piece goes to the innermost phase.
        lo = bisect.bisect_right(starts, g1)
        near = [p for p in phases[:lo] if p[1] > g0]
        cuts = sorted({g0, g1} | {t for p in near for t in p[:2] if g0 < t < g1})
        for a, b in zip(cuts, cuts[1:]):
            mid = (a + b) / 2
            inside = [p for p in near if p[0] <= mid < p[1]]
            idle[min(inside, key=lambda p: p[1] - p[0])[2] if inside else "(none)"] += b - a
    return {k: round(v / 1000 / iters, 3) for k, v in idle.most_common(top)}


def profile_pass(trainer, first: int, iters: int, table: Path | None = None, trace: Path | None = None) -> dict:
    """Per step: kernel launches, syncs, GPU busy ms (union of device intervals), top kernels.
    ``trace``: also write the profiler's Chrome trace there (gzipped when it ends in ``.gz``; open
    it in Perfetto or chrome://tracing to see, per phase, the host's ops and the GPU's gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        timed_pass(trainer, first, iters)
    if table is not None:
        averages = prof.key_averages()
        table.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=60) + "\n"
                         + averages.table(sort_by="self_cuda_time_total", row_limit=40))
    if trace is not None:
        prof.export_chrome_trace(str(trace))  # torch gzips a ".gz" path itself
    events = prof.events()
    device = device_events(events)
    runtime = Counter(e.name for e in events if e.device_type == DeviceType.CPU
                      and (e.name in _LAUNCH_NAMES or e.name in _SYNC_NAMES))
    kernels: Counter = Counter()
    for e in device:
        kernels[e.name] += e.time_range.elapsed_us()
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in device])
    return {
        "kernel_launches_per_step": sum(runtime[n] for n in _LAUNCH_NAMES) / iters,
        "device_ops_per_step": len(device) / iters,
        "host_syncs_per_step": {n: runtime[n] / iters for n in _SYNC_NAMES if runtime[n]},
        "gpu_busy_ms_per_step": busy_us / 1000 / iters,
        "gpu_idle_ms_per_step_by_phase": idle_by_phase(events, iters),
        "top_kernels_ms_per_step": {k[:90]: round(v / 1000 / iters, 3) for k, v in kernels.most_common(15)},
    }


def sync_sites(trainer, first: int, iters: int, top: int = 25) -> dict[str, float]:
    """Where the step synchronises the host with the GPU: per step, how often each call site does
    (:func:`sync_sites_of` ``iters`` training steps)."""
    return sync_sites_of(lambda: timed_pass(trainer, first, iters), iters, top)


def sync_sites_of(run, iters: int, top: int = 25) -> dict[str, float]:
    """Call sites synchronising the host with the GPU while ``run()`` does ``iters`` units of work
    (steps, frames): per unit, how often each site does.

    Runs ``run()`` under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every
    synchronising CUDA call; each warning is attributed to the innermost stack frame inside this
    project (else the innermost outside the standard library), as ``file:line function``.
    """
    import traceback
    import warnings

    if not torch.cuda.is_available():
        return {}
    sites: Counter = Counter()

    def on_warning(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if "evolsplat_ns" in f.filename]
        outside = [f for f in frames if "/torch/" not in f.filename and "warnings" not in f.filename]
        f = (ours or outside or frames)[-1]
        sites[f"{Path(f.filename).name}:{f.lineno} {f.name}"] += 1

    previous = warnings.showwarning
    warnings.showwarning = on_warning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    return {k: v / iters for k, v in sites.most_common(top)}


def host_profile(trainer, first: int, iters: int, top: int = 30, out: Path | None = None) -> dict[str, dict]:
    """Where the host's time goes: ``iters`` steps under cProfile, the ``top`` functions by own
    time (ms per step, own and cumulative, calls per step). On CUDA the kernels run asynchronously,
    so this is the Python, dispatcher and launch cost that bounds a host-bound step."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    _sync()
    profiler.enable()
    timed_pass(trainer, first, iters)
    profiler.disable()
    stats = pstats.Stats(profiler)
    if out is not None:
        stats.dump_stats(str(out))

    def row(key, value) -> tuple[str, dict]:
        (filename, line, name), (_, calls, own, cumulative, _) = key, value
        where = "/".join(Path(filename).parts[-2:]) if filename != "~" else "builtin"
        return f"{where}:{line} {name}", {"own_ms": round(1000 * own / iters, 2),
                                          "cum_ms": round(1000 * cumulative / iters, 2),
                                          "calls": round(calls / iters, 1)}

    items = stats.stats.items()
    ours = [kv for kv in items if "evolsplat_ns" in kv[0][0] or "nerfstudio" in kv[0][0]]
    return {"by_own_time": dict(row(*kv) for kv in sorted(items, key=lambda kv: -kv[1][2])[:top]),
            "ours_by_cumulative_time": dict(row(*kv) for kv in sorted(ours, key=lambda kv: -kv[1][3])[:top])}


def print_table(r: dict) -> None:
    rows = [("iterations/s", f"{r['iterations_per_s']:.2f}"), ("ms/iteration", f"{r['ms_per_iteration']:.1f}"),
            ("peak GPU memory (GB)", f"{r['peak_gpu_memory_gb']:.2f}" if r["peak_gpu_memory_gb"] else "-"),
            ("Gaussians/segment", ", ".join(f"{v:,}" for v in r["gaussians_per_segment"].values()))]
    prof = r.get("profile") or {}
    if prof:
        rows += [("kernel launches/step", f"{prof['kernel_launches_per_step']:.0f}"),
                 ("GPU busy ms/step", f"{prof['gpu_busy_ms_per_step']:.1f}"),
                 ("GPU busy fraction", f"{r['gpu_busy_fraction']:.0%}" if r["gpu_busy_fraction"] else "-"),
                 ("GPU idle ms/step by phase", ", ".join(f"{k} {v:.1f}" for k, v in
                                                          prof["gpu_idle_ms_per_step_by_phase"].items())),
                 ("host syncs/step", ", ".join(f"{k} {v:.0f}" for k, v in prof["host_syncs_per_step"].items()))]
    rows += [(f"  phase {k} (ms)", f"{v:.1f}") for k, v in r["ms_per_phase"].items()]
    width = max(len(k) for k, _ in rows)
    print(f"{r['device']} {r['image']} {r['source_views']} src + {r['target_views']} tgt, amp={r['amp']}, tf32={r.get('tf32_matmul')}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_args(p)
    p.add_argument("--phase-iters", type=int, default=10, help="steps with phase timers (0 = skip)")
    p.add_argument("--profile-iters", type=int, default=5, help="steps under torch.profiler (0 = skip)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--profile-table", type=Path, default=None, help="write the profiler's op tables here")
    p.add_argument("--profile-trace", type=Path, default=None,
                   help="write the profiled steps' Chrome trace here (.json, or .json.gz compressed)")
    p.add_argument("--sync-iters", type=int, default=0,
                   help="then list, per step, the call sites that synchronise the host with the GPU")
    p.add_argument("--host-iters", type=int, default=0,
                   help="then run this many steps under cProfile: the functions taking the host's time, per step")
    p.add_argument("--host-stats", type=Path, default=None, help="dump those steps' cProfile stats here (pstats)")
    p.add_argument("--eval", action="store_true",
                   help="then score the held-out views (PSNR after this run's steps; compare runs of equal steps)")
    p.add_argument("--viewer-frames", type=int, default=0,
                   help="then time the viewer's render on the trained pipeline (viewer_fps.py's figures)")
    p.add_argument("--viewer-profile-frames", type=int, default=0,
                   help="with --viewer-frames: profile this many cached-encoding frames (launches, idle by phase)")
    args = p.parse_args()

    trainer = build_trainer(args)
    cuda = torch.cuda.is_available()
    step = 0
    timed_pass(trainer, step, args.warmup)
    step += args.warmup
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wall = timed_pass(trainer, step, args.iters)
    step += args.iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    phases = phase_pass(trainer, step, args.phase_iters) if args.phase_iters > 0 else {}
    step += args.phase_iters
    prof = (profile_pass(trainer, step, args.profile_iters, args.profile_table, args.profile_trace)
            if args.profile_iters > 0 else None)
    step += args.profile_iters
    syncs = sync_sites(trainer, step, args.sync_iters) if args.sync_iters > 0 else None
    step += args.sync_iters
    host = host_profile(trainer, step, args.host_iters, out=args.host_stats) if args.host_iters > 0 else None
    step += args.host_iters
    held_out = viewer = None
    pipeline = trainer.pipeline
    if args.eval:
        held_out = pipeline.get_average_eval_image_metrics(step=step)
        pipeline.train()
    if args.viewer_frames > 0:
        from viewer_fps import measure

        pipeline.eval()
        sample = pipeline.model.context.sources
        table = args.profile_table.with_name(args.profile_table.stem + "-viewer.txt") if args.profile_table else None
        viewer = measure(pipeline, args.viewer_frames, 0.1, sample.width, sample.height, 60.0,
                         profile=args.viewer_profile_frames, profile_table=table)
    trainer.report_deferred_skip()  # the last step's, under nonfinite_check=deferred
    segments = trainer.pipeline.model.segments
    sample = trainer.pipeline.model.context.sources
    ms = 1000 * wall / args.iters
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "image": f"{sample.width}x{sample.height}",
        "source_views": args.sources * len(args.cameras),
        "target_views": args.targets * len(args.cameras),
        "iterations_per_s": args.iters / wall,
        "ms_per_iteration": ms,
        "ms_per_phase": phases,
        "peak_gpu_memory_gb": peak,
        "gaussians_per_segment": {str(k): len(segments.get(k).node) for k in segments.keys()},
        "amp": args.amp or "off",
        "tf32_matmul": args.tf32,
        "profile": prof,
        "gpu_busy_fraction": prof["gpu_busy_ms_per_step"] / ms if prof and cuda else None,
        "sync_sites_per_step": syncs,
        "host_top_functions_per_step": host,
        "skipped_steps": dict(trainer.skipped_steps),
        "steps_trained": step,
        "held_out": held_out,
        "viewer": viewer,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    print_table(result)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
