"""Data-parallel training throughput: it/s and samples/s with 1, 2, ... processes on the same data.

For each ``--nprocs`` N this launches ``torchrun --nproc_per_node N`` on this script's worker
(``--worker``), which builds the trainer of ``benchmarks/train_throughput.py`` (same flags), runs
``--warmup`` then ``--iters`` real steps (``EVolSplatTrainer.train_step``: per-target backward, one
gradient all-reduce, optimizer step) and reports, from rank 0 after a barrier:

- iterations/s (every rank takes one step per iteration), samples/s = N x iterations/s,
- speed-up (samples/s over N=1's) and scaling efficiency (speed-up / N),
- peak CUDA memory per rank (GB), and the gradient all-reduce's ms per step (a short extra pass
  with the phase timers, which synchronise CUDA and so stay out of the timed pass).

NCCL on CUDA, gloo on CPU (chosen by the trainer from the device); nothing else differs, so the
same command measures GPUs::

    evolsplat-synth --out /tmp/synth9 --scenes 9 --frames 24 --cameras 1 --width 960 --height 640
    python benchmarks/distributed_throughput.py --data /tmp/synth9 --nprocs 1 2 4 8 --iters 50

Every rank needs at least one training segment (``N <= segments``); 9 scenes (1 held out) of 24
frames give 16. On a CPU the processes share the machine's cores, so CPU figures say nothing
about GPU scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from evolsplat_ns.utils import timing
from train_throughput import add_trainer_args, build_trainer, timed_pass


def worker(args: argparse.Namespace) -> None:
    from evolsplat_ns.engine import distributed

    world = distributed.world_from_env()
    args.output_dir = str(Path(args.output_dir) / f"nprocs{world.size}")
    trainer = build_trainer(args)  # joins the process group from torchrun's environment
    d = distributed.current()
    cuda = torch.cuda.is_available()
    timed_pass(trainer, 0, args.warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    d.barrier("the benchmark's start")
    start = time.perf_counter()
    timed_pass(trainer, args.warmup, args.iters)
    d.barrier("the benchmark's end")  # the slowest rank's time: every rank waits for it each step anyway
    wall = time.perf_counter() - start
    # A short second pass with the phase timers (they synchronise CUDA, so not in the timed pass).
    timing.enable()
    timing.reset()
    timed_pass(trainer, args.warmup + args.iters, args.phase_iters)
    allreduce_ms = 1000 * timing.totals().get("allreduce", 0.0) / max(args.phase_iters, 1)
    timing.enable(False)
    peaks = d.gather_objects(torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "gathering peak memory")
    if world.is_main:
        print("RESULT " + json.dumps({
            "nprocs": world.size, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "backend": "nccl" if cuda else "gloo", "iterations_per_s": args.iters / wall,
            "samples_per_s": world.size * args.iters / wall, "allreduce_ms_per_step": allreduce_ms,
            "peak_gpu_memory_gb_per_rank": peaks, "segments_per_rank": len(trainer.pipeline.datamanager.dataset.train_segment_ids),
            "skipped_steps": dict(trainer.skipped_steps)}), flush=True)


def launch(n: int, argv: list[str]) -> dict:
    """Run the worker under torchrun with ``n`` processes; its RESULT line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).resolve()), "--worker", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # same threads at every N
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{n} process(es) failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_args(p)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--phase-iters", type=int, default=5, help="steps timing the gradient all-reduce")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        worker(args)
        return
    results = [launch(n, sys.argv[1:]) for n in args.nprocs]  # the worker ignores --nprocs and --json
    base = results[0]["samples_per_s"] / results[0]["nprocs"]
    print(f"{results[0]['device']} ({results[0]['backend']}), {args.method}, {args.iters} timed steps")
    print(f"{'procs':>5} {'it/s':>7} {'samples/s':>10} {'speed-up':>9} {'efficiency':>10} {'all-reduce ms':>13} "
          f"{'peak GB/rank':>13}")
    for r in results:
        speedup = r["samples_per_s"] / base
        peaks = r["peak_gpu_memory_gb_per_rank"]
        peak = f"{max(peaks):.2f}" if peaks and peaks[0] is not None else "-"
        print(f"{r['nprocs']:>5} {r['iterations_per_s']:>7.2f} {r['samples_per_s']:>10.2f} {speedup:>8.2f}x "
              f"{speedup / r['nprocs']:>9.0%} {r['allreduce_ms_per_step']:>13.2f} {peak:>13}")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
