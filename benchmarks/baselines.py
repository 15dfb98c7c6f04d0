"""Ours zero-shot vs baselines on the same held-out views of one held-out scene, in one table.

Rows (every one scored by ``engine.evaluation.view_metrics`` on the held-out views that
``evolsplat-infer`` scores; definitions in docs/metrics.md):

- **ours zero-shot**: the trained model's feed-forward reconstruction (``evaluate_zero_shot``).
- **(a) nearest source view**: the nearest source image forward-splatted with its depth
  (``evolsplat_ns/inference/reprojection.py``).
- **(b) splatfacto**: nerfstudio's splatfacto trained on the exported scene alone
  (``evolsplat-data export-nerfstudio``) for the wall time of ours + fine-tuning (or
  ``--splatfacto-seconds``); CUDA only, skipped on CPU with a line saying so.
- **(c) ours + fine-tune**: ``evolsplat-finetune``'s optimisation for ``--finetune-steps`` steps.

Writes into a new or empty ``--out``: ``baselines.json``, ``baselines.md`` (the table),
``psnr_vs_seconds.png`` (held-out PSNR against seconds of optimisation/prediction for (b) and
(c), ours zero-shot and (a) as points), ``zero_shot_grid.png`` (and ``zero_shot_grid.jpg``, a
JPEG copy at most 1600 px wide), and the run / export folders.

    # CPU check at tiny size (trains a lite model first; splatfacto skipped)
    python benchmarks/baselines.py --out /tmp/bl --train-steps 200 --width 96 --height 64 --finetune-steps 100
    # a trained run, its held-out scene found from its config
    python benchmarks/baselines.py --out /tmp/bl --load-config RUN/config.yml --finetune-steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_setup import set_field  # noqa: E402

ROW_KEYS = ("psnr", "ssim", "psnr_sky", "psnr_non_sky", "psnr_dynamic", "psnr_static", "depth_abs_rel")


def train_run(args: argparse.Namespace, out: Path) -> Path:
    """Generate synthetic data if needed, train ``--method`` for ``--train-steps``; the run's config.yml."""
    from evolsplat_ns.method_configs import evolsplat_config, evolsplat_lite_config

    data = args.data or out / "data"
    if not data.is_dir():
        from evolsplat_ns.data.synth import SynthConfig, generate_dataset

        generate_dataset(SynthConfig(scenes=args.scenes, frames=args.frames, cameras=args.cameras, width=args.width,
                                     height=args.height, moving_cars=args.moving_cars, seed=args.seed), data)
    torch.manual_seed(0)
    cfg = evolsplat_lite_config() if args.method == "lite" else evolsplat_config()
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.output_dir, cfg.timestamp, cfg.vis = out / "runs", "baselines", "tensorboard"
    cfg.machine.device_type = args.device
    cfg.max_num_iterations = args.train_steps
    cfg.pipeline.datamanager.dataset.pointcloud_generator = args.generator
    for flag in args.set:
        set_field(cfg, flag)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    start = time.perf_counter()
    for step in range(args.train_steps):
        trainer.train_step(step)
    print(f"trained {args.method} {args.train_steps} steps in {time.perf_counter() - start:.0f} s")
    trainer.save_checkpoint(args.train_steps - 1)
    trainer.config.save_config()
    trainer.pipeline.datamanager.dataset.close()
    return trainer.base_dir / "config.yml"


def _small_jpeg(png: Path, jpg: Path, max_width: int = 1600) -> Path:
    """A JPEG copy of ``png`` at most ``max_width`` wide: full-size grids at 960x640 run to tens
    of MB, too large to fetch from a remote GPU machine or to keep in docs."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    if im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    im.save(jpg, quality=85)
    return jpg


def held_out_scene(config: Path) -> Path:
    """The run's first eval scene folder (never trained on unless the run said so)."""
    from evolsplat_ns.inference.loading import load_pipeline

    _, pipeline, _ = load_pipeline(config)
    ds = pipeline.datamanager.dataset
    try:
        scene = ds.scenes[sorted(ds.eval_scene_ids)[0]]
        return Path(scene.layout.root)
    finally:
        ds.close()


def finetune_all(pipeline, cfg) -> tuple[dict, list[dict]]:
    """(c) on every segment holding held-out views; the report and the combined PSNR-vs-seconds
    curve (seconds summed over segments, PSNR averaged over all held-out views)."""
    from evolsplat_ns.inference.finetune import finetune_report, finetune_segment

    dataset = pipeline.datamanager.dataset
    runs = [finetune_segment(pipeline.model, dataset, i, cfg) for i in sorted({s for s, _ in dataset.eval_items})]
    curve = []
    for k in range(len(runs[0].log)):
        weights = [len(r.views) for r in runs]
        curve.append({"step": runs[0].log[k]["step"],
                      "seconds": sum(r.init_seconds + r.log[k]["seconds"] for r in runs),
                      "held_out_psnr": float(np.average([r.log[k]["held_out_psnr"] for r in runs], weights=weights)),
                      "train_psnr": float(np.mean([r.log[k]["train_psnr"] for r in runs]))})
    return finetune_report(runs, cfg), curve


def export_scene(scene: Path, out: Path, dataset) -> Path:
    """The held-out scene as a nerfstudio dataset, checked to hold out exactly our eval frames."""
    from evolsplat_ns.data.nerfstudio_export import NerfstudioExport, export_nerfstudio

    plan = next(iter(dataset.plans.values()))
    result = export_nerfstudio(NerfstudioExport(scene, out, eval_frame_interval=plan["eval_frame_interval"]))
    ours = sorted({t for _, t in dataset.eval_items})
    if result.held_out_frames != ours:
        raise SystemExit(f"export held out frames {result.held_out_frames}, the evaluation {ours}: not comparable")
    return out


def plot(curves: dict[str, list[dict]], points: dict[str, tuple[float, float]], path: Path) -> Path:
    """Held-out PSNR vs seconds: a line per curve, a marker per point (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, curve in curves.items():
        ax.plot([c["seconds"] for c in curve], [c["held_out_psnr"] for c in curve], marker=".", label=name)
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=60, marker="*", label=name, zorder=3)
    ax.set_xlabel("seconds (prediction + optimisation, evaluation excluded)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def table(rows: dict[str, dict]) -> str:
    head = "| method | seconds | " + " | ".join(ROW_KEYS) + " | views |\n|" + " --- |" * (len(ROW_KEYS) + 3)
    lines = [head]
    for name, r in rows.items():
        if r is None:
            lines.append(f"| {name} | skipped | " + " | ".join("" for _ in ROW_KEYS) + " | |")
            continue
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else "" for k in ROW_KEYS]
        lines.append(f"| {name} | {r['seconds']:.1f} | " + " | ".join(cells) + f" | {r['num_views']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder")
    parser.add_argument("--load-config", type=Path, default=None, help="a trained run (else one is trained here)")
    parser.add_argument("--eval-scene", type=Path, default=None, help="held-out scene folder (default: the run's)")
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--finetune-eval-every", type=int, default=100)
    parser.add_argument("--splatfacto-seconds", type=float, default=None,
                        help="splatfacto's budget (default: ours zero-shot prediction + fine-tuning seconds)")
    parser.add_argument("--splatfacto-eval-every", type=float, default=None,
                        help="seconds between splatfacto evaluations (default: budget / 8)")
    parser.add_argument("--eval-set", action="append", default=[], metavar="PATH=VALUE",
                        help="set an attribute of the loaded pipeline before evaluating, e.g. "
                             "model.config.normalize_background=False (render-time settings only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = parser.add_argument_group("training here (without --load-config)")
    g.add_argument("--train-steps", type=int, default=300)
    g.add_argument("--method", choices=("lite", "full"), default="lite" if not torch.cuda.is_available() else "full")
    g.add_argument("--data", type=Path, default=None, help="training data (default: generated under --out)")
    g.add_argument("--scenes", type=int, default=3)
    g.add_argument("--frames", type=int, default=16)
    g.add_argument("--cameras", type=int, default=3)
    g.add_argument("--width", type=int, default=96)
    g.add_argument("--height", type=int, default=64)
    g.add_argument("--moving-cars", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--generator", default="auto", help="point-cloud generator (auto, lidar, depth, hybrid)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="trainer config field, e.g. pipeline.model.sky_loss_weight=1.0 (repeatable)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # spconv on CPU is only correct single-threaded

    from evolsplat_ns.inference.finetune import FinetuneConfig
    from evolsplat_ns.inference.loading import DatasetOverrides, load_pipeline
    from evolsplat_ns.inference.outputs import save_grid
    from evolsplat_ns.inference.reprojection import evaluate_nearest_source
    from evolsplat_ns.inference.zero_shot import evaluate_zero_shot

    out = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty; choose a new folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    config = args.load_config or train_run(args, out)
    scene = args.eval_scene or held_out_scene(config)
    print(f"held-out scene: {scene}")
    _, pipeline, checkpoint = load_pipeline(config, DatasetOverrides(data=scene, all_scenes_eval=True),
                                            device=args.device)
    for flag in args.eval_set:
        set_field(pipeline, flag)
    dataset = pipeline.datamanager.dataset
    rows: dict[str, dict | None] = {}
    try:
        zs = evaluate_zero_shot(pipeline, max_grid_rows=4, progress=False)
        save_grid(zs.grid_rows, out / "zero_shot_grid.png", zs.grid_labels)
        _small_jpeg(out / "zero_shot_grid.png", out / "zero_shot_grid.jpg")
        t = zs.timing
        zs_seconds = sum(t[k]["mean_ms"] * t[k]["count"] for k in ("encode_ms", "render_ms")) / 1e3
        rows["ours zero-shot"] = {**zs.metrics, "seconds": zs_seconds}
        start = time.perf_counter()
        nearest = evaluate_nearest_source(dataset)
        rows["(a) nearest source view"] = {**nearest, "seconds": time.perf_counter() - start}
        ft_report, ft_curve = finetune_all(pipeline, FinetuneConfig(steps=args.finetune_steps,
                                                                    eval_every=args.finetune_eval_every))
        ft_seconds = ft_curve[-1]["seconds"]
        curves = {f"(c) ours + fine-tune ({args.finetune_steps} steps)": ft_curve}
        budget = args.splatfacto_seconds or ft_seconds
        if torch.cuda.is_available() and args.device == "cuda":
            from splatfacto_budget import run_splatfacto

            export = export_scene(scene, out / "nerfstudio_export", dataset)
            sf = run_splatfacto(export, out / "splatfacto", budget, dataset, args.splatfacto_eval_every or budget / 8)
            rows[f"(b) splatfacto ({sf['steps']} steps)"] = {**sf["final"], "seconds": sf["seconds"]}
            curves["(b) splatfacto"] = sf["log"]
        else:
            print(f"(b) splatfacto skipped: it needs CUDA (gsplat's CUDA rasteriser); device is {args.device}")
            rows["(b) splatfacto"] = None
        rows[f"(c) ours + fine-tune ({args.finetune_steps} steps)"] = {**ft_report, "seconds": ft_seconds}
    finally:
        dataset.close()
    plot(curves, {"ours zero-shot": (zs_seconds, rows["ours zero-shot"]["psnr"]),
                  "(a) nearest source view": (rows["(a) nearest source view"]["seconds"],
                                              rows["(a) nearest source view"]["psnr"])}, out / "psnr_vs_seconds.png")
    md = table(rows)
    report = {"config": str(config), "checkpoint": str(checkpoint), "scene": str(scene), "device": args.device,
              "eval_set": args.eval_set, "rows": rows, "curves": curves, "splatfacto_budget_s": budget}
    (out / "baselines.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "baselines.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out / 'baselines.json'}, {out / 'baselines.md'}, {out / 'psnr_vs_seconds.png'}")
    return report


if __name__ == "__main__":
    main()
