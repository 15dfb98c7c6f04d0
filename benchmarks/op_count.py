"""Dispatched aten ops per training step, stage 2 off vs on, by source line: a CPU proxy of GPU launches.

The training step is launch-bound on a large GPU (thousands of small kernels, the GPU mostly idle),
so the number of ops a piece of code dispatches is the best CPU-side estimate of what it costs
there. This counts them (``TorchDispatchMode``: every aten op below autograd, i.e. each op that
would launch kernels) over ``--steps`` training steps, after ``--warmup`` steps, and groups them by
the innermost ``evolsplat_ns`` source line that issued them:

- forward ops: the line on the Python stack when the op ran;
- backward ops (run by the autograd engine, ``torch._C._current_autograd_node()`` set): the
  forward line that built the autograd node (anomaly mode records each node's forward stack), so
  a line's row is its forward + backward cost;
- the CPU reference renderer (``model/render/reference``) is one lumped site, forward and backward
  (on the GPU gsplat's few fused kernels replace it); pure metadata ops (views, reshapes, detach,
  empty) are not counted (no kernel).

Each run is built like ``stage2_overhead.py``'s (same generated data with moving cars and box
noise, stage 2 from step 0 at ``--frequency``): ``--preset off`` is the method without stage 2.
With several presets the table shows each site's ops per step in every run and the difference to
the first. Prints the table and the JSON (``--json FILE`` also writes it).

    python benchmarks/op_count.py --out /tmp/s2ops --width 96 --height 64 --lite --device cpu \\
        --presets off standard --frequency 1 --steps 2 --warmup 2

``--set FIELD=VALUE`` changes a config field in every run, e.g. ``--set
pipeline.model.single_draw_background=False`` (two rasteriser calls per target, the sky dome
apart).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import add_synth_args, set_field, synth_dataset  # noqa: E402
from stage2_overhead import PRESETS, _config  # noqa: E402

METADATA_OPS = ("aten.view", "aten.t.", "aten._unsafe_view", "aten.detach", "aten.alias", "aten.as_strided",
                "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.slice", "aten.select", "aten.permute",
                "aten.transpose", "aten.split", "aten.unbind", "aten.lift_fresh", "aten._reshape_alias",
                "aten.reshape", "aten.empty", "aten.new_empty", "aten.numpy_T", "aten.chunk", "aten.narrow",
                "aten.unfold", "aten.view_as", "aten.expand_as", "aten.movedim", "aten.diagonal",
                "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.is_same_size",
                "aten._record_function", "profiler.")
"""Ops that only make a new view of existing storage (or allocate): no kernel on the GPU."""
HOST_READS = ("aten._local_scalar_dense",)
REFERENCE_RENDERER = "render/reference"
"""Lumped site: the CPU reference rasteriser (gsplat replaces it on the GPU)."""
OURS = "evolsplat_ns/"


def _site(frames: list[tuple[str, int, str]]) -> str:
    """Innermost project frame of a stack (outermost first) as ``file:line function``."""
    for filename, lineno, name in reversed(frames):
        if OURS in filename:
            f = filename.split(OURS)[-1]
            return REFERENCE_RENDERER if REFERENCE_RENDERER in f else f"{f}:{lineno} {name}"
    return "(outside evolsplat_ns)"


def _parse_anomaly_trace(lines) -> list[tuple[str, int, str]]:
    """Frames of an anomaly-mode forward traceback (``traceback.format_stack`` strings)."""
    out = []
    for entry in lines:
        head = entry.strip().splitlines()[0] if entry.strip() else ""
        # '  File "path", line N, in name'
        if head.startswith("File "):
            try:
                path = head.split('"')[1]
                rest = head.split('", line ')[1]
                lineno, name = rest.split(", in ")
                out.append((path, int(lineno), name.strip()))
            except (IndexError, ValueError):
                continue
    return out


class OpCounter(TorchDispatchMode):
    """Counts non-metadata aten ops by (site, 'fwd' | 'bwd')."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(HOST_READS):
            # a scalar read (.item(), .tolist(), bool()): a device sync on the GPU when the tensor is
            # there, counted apart (the optimizers' step counters are host tensors: no sync)
            self.reads[_site([(f.filename, f.lineno, f.name) for f in traceback.extract_stack(limit=60)])] += 1
        elif not name.startswith(METADATA_OPS):
            node = torch._C._current_autograd_node()
            if node is None:
                site = _site([(f.filename, f.lineno, f.name) for f in traceback.extract_stack(limit=60)])
                kind = "fwd"
            else:
                # (not cached by id(node): node wrappers are short-lived and their ids reused)
                trace = node.metadata.get("traceback_")
                site = _site(_parse_anomaly_trace(trace)) if trace else f"(autograd {node.name()})"
                kind = "bwd"
            self.counts[(site, kind)] += 1
            self.ops[name.split(".")[1] if "." in name else name] += 1
        return func(*args, **(kwargs or {}))


def count_run(args: argparse.Namespace, preset: str) -> dict:
    """Ops per step (by site and kind) and CPU ms per step of one run (``preset`` 'off' = no stage 2)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    cfg = _config(args, None if preset == "off" else preset, args.frequency)
    for flag in args.set:
        set_field(cfg, flag)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    if args.foreach:
        for optimizer in trainer.optimizers.optimizers.values():
            for group in optimizer.param_groups:
                group["foreach"] = True
    for step in range(args.warmup):
        trainer.train_step(step)
    first = args.warmup
    start = time.perf_counter()
    for step in range(first, first + args.steps):
        trainer.train_step(step)
    if args.device == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - start) / args.steps
    controller = getattr(trainer.pipeline, "stage2_controller", None)
    runs_before = len(controller.state_dict()["series"]["times"]) if controller is not None else 0
    counter = OpCounter()
    # anomaly mode records each autograd node's forward stack (backward ops are attributed to it)
    with torch.autograd.detect_anomaly(check_nan=False), counter:
        for step in range(first + args.steps, first + 2 * args.steps):
            trainer.train_step(step)
    runs = (len(controller.state_dict()["series"]["times"]) - runs_before) if controller is not None else 0
    trainer.pipeline.datamanager.dataset.close()
    n = args.steps
    sites: dict[str, dict[str, float]] = {}
    for (site, kind), v in counter.counts.items():
        sites.setdefault(site, {"fwd": 0.0, "bwd": 0.0})[kind] += v / n
    fwd = sum(s["fwd"] for s in sites.values())
    bwd = sum(s["bwd"] for s in sites.values())
    ref = sites.get(REFERENCE_RENDERER, {"fwd": 0.0, "bwd": 0.0})
    return {"preset": preset, "frequency": args.frequency, "foreach": args.foreach, "cpu_ms_per_step": ms, "stage2_runs": runs,
            "ops_per_step": fwd + bwd, "fwd_per_step": fwd, "bwd_per_step": bwd,
            "ops_per_step_without_reference_renderer": fwd + bwd - ref["fwd"] - ref["bwd"],
            "sites": dict(sorted(sites.items(), key=lambda kv: -(kv[1]["fwd"] + kv[1]["bwd"]))),
            "scalar_reads_per_step": sum(counter.reads.values()) / n,
            "scalar_reads": {k: v / n for k, v in counter.reads.most_common()},
            "top_ops": {k: v / n for k, v in counter.ops.most_common(25)}}


def table(results: list[dict], top: int) -> str:
    """Per site: fwd+bwd ops per step of each run (and the difference of the last run to the first)."""
    head = [f"{'run':<22}{'ops/step':>10}{'fwd':>8}{'bwd':>8}{'no-ref':>9}{'reads':>7}{'s2 runs':>8}{'CPU ms':>9}"]
    for r in results:
        head.append(f"{r['preset'] + '/f' + str(r['frequency']):<22}{r['ops_per_step']:>10.0f}{r['fwd_per_step']:>8.0f}"
                    f"{r['bwd_per_step']:>8.0f}{r['ops_per_step_without_reference_renderer']:>9.0f}"
                    f"{r['scalar_reads_per_step']:>7.0f}{r['stage2_runs']:>8}{r['cpu_ms_per_step']:>9.0f}")
    names = list(dict.fromkeys(s for r in results for s in r["sites"]))
    get = lambda r, s: r["sites"].get(s, {"fwd": 0.0, "bwd": 0.0})  # noqa: E731
    last, first = results[-1], results[0]
    names.sort(key=lambda s: -abs(sum(get(last, s).values()) - (sum(get(first, s).values()) if len(results) > 1 else 0)))
    cols = "".join(f"{r['preset'][:8]:>10}" for r in results)
    lines = ["", f"{'ops/step by site (fwd+bwd; sorted by ' + ('difference' if len(results) > 1 else 'ops') + ')':<70}"
             f"{cols}{'fwd':>8}{'bwd':>8}" + (f"{'diff':>8}" if len(results) > 1 else "")]
    for s in names[:top]:
        vals = "".join(f"{sum(get(r, s).values()):>10.1f}" for r in results)
        diff = sum(get(last, s).values()) - sum(get(first, s).values())
        lines.append(f"{s[:69]:<70}{vals}{get(last, s)['fwd']:>8.1f}{get(last, s)['bwd']:>8.1f}"
                     + (f"{diff:>+8.1f}" if len(results) > 1 else ""))
    files = list(dict.fromkeys(s.split(":")[0] for s in names))
    per_file = lambda r, f: sum(sum(v.values()) for s, v in r["sites"].items() if s.split(":")[0] == f)  # noqa: E731
    files.sort(key=lambda f: -abs(per_file(last, f) - (per_file(first, f) if len(results) > 1 else 0)))
    lines += ["", f"{'ops/step by file':<70}{cols}" + (f"{'diff':>8}" if len(results) > 1 else "")]
    for f in files:
        if any(per_file(r, f) >= 0.5 for r in results):
            lines.append(f"{f[:69]:<70}" + "".join(f"{per_file(r, f):>10.1f}" for r in results)
                         + (f"{per_file(last, f) - per_file(first, f):>+8.1f}" if len(results) > 1 else ""))
    return "\n".join(head + lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_synth_args(p, width=96, height=64, moving_cars=4, device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", default=["off", "standard"], choices=["off", *PRESETS],
                   help="runs ('off': the method without stage 2); the table's difference is last minus first")
    p.add_argument("--frequency", type=int, default=1, help="stage-2 frequency (1: a run every step)")
    p.add_argument("--lite", action="store_true", help="the lite methods (evolsplat-lite / evolsplat-stage2-lite + preset)")
    p.add_argument("--steps", type=int, default=2, help="counted steps (after as many uncounted, timed ones)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--foreach", choices=("on", "off"), default="on",
                   help="optimizers' multi-tensor (foreach) step, as torch's default on CUDA (on CPU it "
                        "defaults to one op per parameter and update, which the GPU does not launch)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--top", type=int, default=45, help="sites shown")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any config field, e.g. pipeline.model.single_draw_background=False (every run)")
    a = p.parse_args()
    a.foreach = a.foreach == "on"
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    synth_dataset(a)
    results = [count_run(a, preset) for preset in a.presets]
    print(json.dumps(results, indent=1))
    print(table(results, a.top))
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
