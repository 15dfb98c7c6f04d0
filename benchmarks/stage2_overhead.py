"""Stage-2 overhead: stage-1 training it/s with stage 2 off vs on, per preset and frequency, and peak memory.

For each preset (``standard`` = configs/stage2_online.yaml, ``memory`` = configs/stage2_memory.yaml,
``minimal`` = configs/stage2_minimal.yaml) and each frequency (default 5, 10, 1), the stage-2
method is built from the preset with stage 2 running from step 0 at that frequency; the baseline
is the same method without stage 2 (``evolsplat``), same data, seed and steps. Each run:

1. ``--warmup`` steps (first kernels, first segments);
2. **amortised**: ``--steps`` timed steps as training meets them: a segment visited for the first
   time since stage 2 started is processed (masks, flow aggregation, trajectory fit) inside the
   step that meets it, so its once-per-segment pass is in this figure;
3. every training segment is shown once (stage 1's nodes and, with stage 2, the processor's pass:
   its seconds per segment are reported as ``processor_s_per_segment``, measured where it ran);
4. **steady state**: ``--steps`` more timed steps, every segment already processed: what stage 2
   costs per step for the rest of a long run.

Timed phases are CUDA-synchronised at both ends; peak memory of the timed steps. Overhead = step
time on / step time off - 1, for both phases. Prints the JSON (``--json FILE`` too) and a table.

Generated data (moving cars with box noise) is written to ``--out/data`` when absent.

    python benchmarks/stage2_overhead.py --out /tmp/s2o --width 96 --height 64 --lite --steps 6 --warmup 2 --device cpu
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

from bench_setup import add_synth_args, synth_dataset

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
    cfg.max_num_iterations = args.warmup + 2 * args.steps
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10**9
    cfg.steps_per_save = 10**9
    return cfg


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(trainer, steps: range, device: str, controller) -> dict:
    """it/s, ms/step and peak memory of ``steps``; with a stage-2 controller its statistics over
    these steps only: runs, ms per run without the processor (refine + loss + backward), the
    processor's seconds the controller attributed to these runs (per run), time shares."""
    series = controller.state_dict()["series"] if controller is not None else {}
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in steps:
        trainer.train_step(step)
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"it_per_s": len(steps) / seconds, "ms_per_step": 1e3 * seconds / len(steps),
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    if controller is not None:
        after = controller.state_dict()["series"]
        new = {k: after[k][len(series.get(k, [])):] for k in after}
        runs = len(new["times"])
        total = sum(new["times"])
        parts = {p: sum(new[f"{p}_times"]) for p in ("segmentation", "flow", "aggregation")}
        parts["refine"] = sum(new["refine_times"])
        process = sum(parts.values()) - parts["refine"]
        out.update(stage2_runs=runs, stage2_ms_per_run=1e3 * (total - process) / runs if runs else 0.0,
                   stage2_processor_ms_per_run=1e3 * process / runs if runs else 0.0,
                   stage2_peak_mem_mb=max(new["peak_mem"], default=0.0),
                   objects=sum(new["objects"]) / runs if runs else 0.0,
                   **{f"time_ratio_{p}": (v / total if total > 0 else 0.0) for p, v in parts.items()})
    return out


def _process_every_segment(trainer) -> list[float]:
    """Show every training segment once (nodes, and the processor's pass where it has not run);
    returns the processor's seconds of each segment (its own timing, wherever it ran)."""
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    seconds = []
    for i in pipeline.datamanager.dataset.train_segment_ids:
        pipeline.show_segment(i)
        with torch.no_grad():
            model.encode()
        motion = model.context.segment.motion
        if motion is not None:
            seconds.append(sum(motion.times.values()))
    return seconds


def measure(args: argparse.Namespace, preset: str | None, frequency: int) -> dict:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = _config(args, preset, frequency).setup(local_rank=0, world_size=1)
    trainer.setup()
    for step in range(args.warmup):
        trainer.train_step(step)
    controller = getattr(trainer.pipeline, "stage2_controller", None)
    first = args.warmup
    amortised = _timed(trainer, range(first, first + args.steps), args.device, controller)
    per_segment = _process_every_segment(trainer)
    steady = _timed(trainer, range(first + args.steps, first + 2 * args.steps), args.device, controller)
    trainer.pipeline.datamanager.dataset.close()
    out = {"amortised": amortised, "steady": steady}
    if controller is not None:
        out["processor_s_per_segment"] = sum(per_segment) / len(per_segment) if per_segment else 0.0
        out["processed_segments"] = len(per_segment)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_synth_args(p, width=960, height=640, moving_cars=4, device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=40, help="timed steps per phase (amortised, steady state)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--frequencies", nargs="+", type=int, default=[5, 10, 1])
    p.add_argument("--lite", action="store_true", help="the CPU-sized lite methods (a CPU check, not the figure)")
    p.add_argument("--runs", nargs="+", default=None, metavar="PRESET/fN",
                   help="explicit runs (e.g. standard/f5 memory/f5) instead of --presets x --frequencies")
    p.add_argument("--json", type=Path, default=None, help="written after every run (a cut-off run keeps the rest)")
    a = p.parse_args()
    synth_dataset(a)
    runs = [(r.split("/f")[0], int(r.split("/f")[1])) for r in a.runs] if a.runs else \
        [(preset, f) for preset in a.presets for f in a.frequencies]
    results = {"off": measure(a, None, 0)}
    for preset, f in runs:
        r = measure(a, preset, f)
        for phase in ("amortised", "steady"):
            r[phase]["overhead"] = r[phase]["ms_per_step"] / results["off"][phase]["ms_per_step"] - 1
        results[f"{preset}/f{f}"] = r
        if a.json is not None:
            a.json.write_text(json.dumps(results, indent=2))
        print(table(results).splitlines()[-1], flush=True)
    print(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    """The figures as a table: per run, steady-state and amortised step time and overhead, peak
    memory, stage-2 ms per run (steady; refine + loss + backward), and the processor's seconds per segment."""
    head = (f"{'run':<14}{'it/s':>7}{'ms/step':>9}{'overhead':>10}{'it/s am.':>9}{'ms am.':>8}{'ovh am.':>9}"
            f"{'peak GB':>9}{'s2 ms/run':>10}{'proc s/seg':>11}")
    rows = [head, "(steady = every segment already processed; am. = amortised, first visits inside the timed steps)"]
    for name, r in results.items():
        st, am = r["steady"], r["amortised"]
        peak = f"{st['peak_mem_gb']:.2f}" if st["peak_mem_gb"] is not None else "n/a"
        ovh = lambda x: f"{100 * x['overhead']:+.1f}%" if "overhead" in x else "-"  # noqa: E731
        s2 = f"{st['stage2_ms_per_run']:.1f}" if "stage2_ms_per_run" in st else "-"
        proc = f"{r['processor_s_per_segment']:.2f}" if "processor_s_per_segment" in r else "-"
        rows.append(f"{name:<14}{st['it_per_s']:>7.2f}{st['ms_per_step']:>9.1f}{ovh(st):>10}{am['it_per_s']:>9.2f}"
                    f"{am['ms_per_step']:>8.1f}{ovh(am):>9}{peak:>9}{s2:>10}{proc:>11}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
