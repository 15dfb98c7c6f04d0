"""A resumable multi-scene training run for the fidelity table, sized for one GPU and a time budget.

Each call continues the same run until it has trained ``--steps`` steps, then stops; a call that
runs out of ``--budget-seconds`` first saves a checkpoint of its last step
(``max_train_seconds``) and the next call resumes from it (``--load-dir``). So a long run fits
into jobs (or device calls) of any length, and killing a call loses at most ``--save-every`` steps.

    # data: 16 synthetic 960x640 scenes (the last one held out), written by 4 processes
    python benchmarks/fidelity_train.py --out OUT --scenes 16 --frames 16 --jobs 4 \\
        --steps 8000 --budget-seconds 540 --generator hybrid --pixel-stride 2 --pc-voxel-size 0.03 \\
        --pc-device cuda [--set pipeline.model.sky_loss_weight=1.0 ...]
    # repeat the same command until it prints "done"; then the table:
    python benchmarks/baselines.py --out OUT/baselines --load-config OUT/run/fidelity/evolsplat/run/config.yml

Writes ``OUT/data`` (generated when absent; ``OUT/data/.complete`` marks a whole dataset),
``OUT/run/...`` (ns-train's run folder, config.yml, checkpoints) and ``OUT/progress.json``
(steps trained, seconds per call, steps per second). Every setting is fixed by the first call; later
calls must pass the same flags (checked against ``OUT/progress.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import add_pointcloud_args, apply_pointcloud_args, set_field  # noqa: E402

RUN = ("fidelity", "evolsplat", "run")
"""experiment / method / timestamp of the run folder under ``OUT/run``."""


def generate(args: argparse.Namespace, data: Path) -> None:
    """``--scenes`` synthetic scenes in ``--jobs`` parallel ``evolsplat-synth`` processes
    (consecutive ``--first-scene`` blocks: scene i is the same whichever process writes it)."""
    if (data / ".complete").is_file():
        return
    if data.exists() and any(data.iterdir()):
        raise SystemExit(f"{data} holds a partial dataset (no .complete): remove it or pass another --out")
    jobs = max(1, min(args.jobs, args.scenes))
    bounds = [round(j * args.scenes / jobs) for j in range(jobs + 1)]
    procs = []
    start = time.perf_counter()
    for first, end in zip(bounds[:-1], bounds[1:]):
        cmd = [sys.executable, "-m", "evolsplat_ns.cli.synth", "--out", str(data), "--scenes", str(end - first),
               "--first-scene", str(first), "--frames", str(args.frames), "--cameras", str(args.cameras),
               "--width", str(args.width), "--height", str(args.height), "--seed", str(args.seed),
               "--raycaster", args.raycaster]
        procs.append(subprocess.Popen(cmd))
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("evolsplat-synth failed (its message is above)")
    (data / ".complete").write_text(json.dumps(vars(args), default=str))
    print(f"generated {args.scenes} scenes in {time.perf_counter() - start:.0f} s", flush=True)


def trainer_config(args: argparse.Namespace, data: Path, out: Path, remaining: int, load_dir: Path | None):
    from evolsplat_ns.method_configs import evolsplat_config

    torch.manual_seed(args.seed)
    cfg = evolsplat_config()
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.output_dir, cfg.experiment_name, cfg.timestamp = out / "run", RUN[0], RUN[2]
    cfg.vis = "tensorboard"
    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.max_num_iterations = remaining  # nerfstudio's loop runs this many more steps after a resume
    cfg.steps_per_save = args.save_every
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10**9
    cfg.max_train_seconds = args.budget_seconds
    cfg.load_dir = load_dir
    for group in cfg.optimizers.values():
        group["scheduler"].max_steps = args.steps  # the schedule spans the whole run, not one call
    apply_pointcloud_args(cfg, args)
    for flag in args.set:
        set_field(cfg, flag)
    return cfg


def write_slim(checkpoint: Path, dest: Path) -> Path:
    """A copy of ``checkpoint`` with the network weights only: no per-segment caches, no optimizer
    state (megabytes instead of hundreds). Enough to evaluate zero-shot or fine-tune elsewhere;
    training cannot resume from it exactly. ``dest`` must not exist."""
    from evolsplat_ns.engine import checkpoints

    if dest.exists():
        raise SystemExit(f"--slim {dest} exists: not replaced")
    state = checkpoints.load_checkpoint(checkpoint)
    pipeline = dict(state["pipeline"])
    pipeline["_model._extra_state"] = {**pipeline["_model._extra_state"], "segments": {}}
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": state["step"], "pipeline": pipeline, "optimizers": {}, "schedulers": {},
                "scalers": state["scalers"]}, dest)
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB, weights only) from {checkpoint}")
    return dest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True, help="steps of the whole run")
    p.add_argument("--budget-seconds", type=float, default=None, help="training seconds of this call")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--slim", type=Path, default=None,
                   help="once done, write a weights-only copy of the last checkpoint here (see write_slim)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any config field")
    g = p.add_argument_group("generated data (OUT/data, when absent)")
    g.add_argument("--scenes", type=int, default=16)
    g.add_argument("--frames", type=int, default=16)
    g.add_argument("--cameras", type=int, default=1)
    g.add_argument("--width", type=int, default=960)
    g.add_argument("--height", type=int, default=640)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--jobs", type=int, default=4, help="parallel generator processes")
    g.add_argument("--raycaster", default="auto")
    add_pointcloud_args(p)
    args = p.parse_args(argv)

    out, data = args.out, args.out / "data"
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "progress.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("budget_seconds", "out", "slim")}
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"settings": settings, "calls": []}
    if progress["settings"] != json.loads(json.dumps(settings, default=str)):
        raise SystemExit(f"{progress_path} was written with other settings: {progress['settings']}; "
                         "pass the same flags, or another --out")
    generate(args, data)

    from evolsplat_ns.engine import checkpoints

    ckpt_dir = out.joinpath("run", *RUN, "nerfstudio_models")
    found = checkpoints.list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    done = found[-1][0] + 1 if found else 0
    if done >= args.steps:
        print(f"done: {done} steps trained; config {ckpt_dir.parent / 'config.yml'}")
        if args.slim is not None:
            write_slim(found[-1][1], args.slim)
        return progress
    cfg = trainer_config(args, data, out, args.steps - done, ckpt_dir if found else None)
    cfg.save_config()  # as ns-train does: config.yml beside the checkpoints (baselines, ns-eval)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.pipeline.datamanager.dataset.close()
    now = checkpoints.list_checkpoints(ckpt_dir)[-1][0] + 1
    progress["calls"].append({"from_step": done, "to_step": now, "seconds": round(seconds, 1),
                              "steps_per_second": round((now - done) / max(seconds, 1e-9), 2),
                              "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                              if torch.cuda.is_available() else None})
    progress_path.write_text(json.dumps(progress, indent=1))
    print(json.dumps(progress["calls"][-1]))
    print(("done: " if now >= args.steps else "continue: ") + f"{now} of {args.steps} steps trained; config "
          f"{ckpt_dir.parent / 'config.yml'}")
    return progress


if __name__ == "__main__":
    main()
