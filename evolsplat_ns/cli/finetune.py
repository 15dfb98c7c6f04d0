"""``evolsplat-finetune``: per-scene fine-tuning of the Gaussians a trained run predicts.

Example::

    evolsplat-finetune --load-config outputs/demo/runs/.../config.yml --data data/new_scene \\
        --steps 500 --output-dir finetuned/ [--segment 000/seg000] [--save-ply]

Every scene of ``--data`` is read as ``evolsplat-infer`` reads new scenes (same held-out views).
``--densify`` (default with the gsplat rasteriser, i.e. on CUDA) grows and prunes the static Gaussians
with gsplat's ``DefaultStrategy`` as splatfacto does. Each segment's resumable state is saved in
``checkpoints/{scene}_seg{NNN}.pt`` every ``--checkpoint-every`` steps and at its end;
``--resume`` continues an interrupted run in the same ``--output-dir`` with the same command
(``--steps`` may grow), giving the parameters an uninterrupted run gives.
For each chosen segment (default: every segment holding held-out views) the model's prediction
becomes plain Gaussian parameters, optimised ``--steps`` steps on the segment's training views
(``evolsplat_ns/inference/finetune.py``). Writes into a new or empty ``--output-dir``:
``metrics.json`` (held-out metrics at the end and at step 0, as ``evolsplat-infer`` reports them),
``psnr_log.json`` (per segment: initialisation seconds, then step / seconds / train and held-out
PSNR) and with ``--save-ply`` one ``{scene}_seg{NNN}.ply`` of the static Gaussians per segment;
``finetune_args.json`` (the command's settings, which ``--resume`` checks) and ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARGS_FILE = "finetune_args.json"
RESUME_FREE_ARGS = ("steps", "resume", "eval_every", "checkpoint_every")
"""Flags a resumed run may change (see ``inference.finetune.RESUME_FREE_SETTINGS``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolsplat-finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True, help="the run's config.yml")
    parser.add_argument("--data", type=Path, required=True, help="scene folder(s) to fine-tune on (drivestudio layout)")
    parser.add_argument("--output-dir", type=Path, required=True, help="new or empty folder for the results")
    parser.add_argument("--steps", type=int, default=500, help="optimisation steps per segment")
    parser.add_argument("--segment", action="append", default=[], metavar="KEY",
                        help="segment key SCENE/segNNN or a scene name (repeatable; default: every segment "
                             "holding held-out views)")
    parser.add_argument("--eval-every", type=int, default=100, help="held-out PSNR every N steps (0 = start and end)")
    parser.add_argument("--eval-frame-interval", type=int, default=None, help="hold out every k-th frame "
                        "(default: the run's, as evolsplat-infer)")
    parser.add_argument("--save-ply", action="store_true", help="write each segment's static Gaussians as 3DGS PLY")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training-view order")
    parser.add_argument("--densify", action=argparse.BooleanOptionalAction, default=None,
                        help="grow and prune the static Gaussians (gsplat DefaultStrategy, splatfacto's settings); "
                             "default: on with the gsplat rasteriser (CUDA), off with the PyTorch reference (CPU)")
    parser.add_argument("--densify-start", type=int, default=500, help="first densification step")
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="save each segment's resumable state every N steps (0 = at its end only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its checkpoints (same command; --steps may grow)")
    return parser


def _saved_args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def _claim(args: argparse.Namespace) -> None:
    """Before any work: a new or empty ``--output-dir`` (nothing is ever replaced), or with
    ``--resume`` the folder of a run started with the same settings."""
    out = args.output_dir
    saved_path = out / ARGS_FILE
    if args.resume:
        if not saved_path.is_file():
            raise FileNotFoundError(f"--resume: {saved_path} not found; --output-dir {out} holds no "
                                    "evolsplat-finetune run to resume (drop --resume to start one)")
        saved, given = json.loads(saved_path.read_text()), _saved_args(args)
        changed = [k for k in given if k not in RESUME_FREE_ARGS and saved.get(k) != given[k]]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {given[k]!r}" for k in changed)
            raise ValueError(f"--resume: {out} was started with other settings ({what}); "
                             "resume with the first command's settings (only --steps may grow)")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        hint = "; or pass --resume to continue the run in it" if saved_path.is_file() else ""
        raise FileExistsError(f"--output-dir {out} exists and is not empty; choose a new folder "
                              f"(evolsplat-finetune never replaces results){hint}")
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(_saved_args(args), indent=1))


def main(argv: list[str] | None = None) -> dict:
    """Run fine-tuning; returns the metrics report (tests call this directly)."""
    from evolsplat_ns.export.exporter import select_segments, splat_filename
    from evolsplat_ns.export.splat import save_splat
    from evolsplat_ns.inference.finetune import FinetuneConfig, finetune_report, finetune_segment, psnr_log
    from evolsplat_ns.inference.loading import DatasetOverrides, load_pipeline
    from evolsplat_ns.inference.outputs import save_metrics

    args = build_parser().parse_args(argv)
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps}: must be >= 0")
    _claim(args)
    cfg = FinetuneConfig(steps=args.steps, eval_every=args.eval_every, seed=args.seed, densify=args.densify,
                         densify_start=args.densify_start, checkpoint_every=args.checkpoint_every)
    (args.output_dir / "checkpoints").mkdir(exist_ok=True)
    _, pipeline, checkpoint = load_pipeline(args.load_config, DatasetOverrides(
        data=args.data, all_scenes_eval=True, eval_frame_interval=args.eval_frame_interval))
    dataset, model = pipeline.datamanager.dataset, pipeline.model
    try:
        held = sorted({s for s, _ in dataset.eval_items})
        segments = select_segments(dataset, args.segment) if args.segment else held
        runs = []
        for i in segments:
            def show(step: int, e: dict, key=dataset.key(i)) -> None:
                held_psnr = "n/a" if e["held_out_psnr"] is None else f"{e['held_out_psnr']:.2f}"
                print(f"{key} step {step:5d}  {e['seconds']:7.1f} s  train PSNR {e['train_psnr']:.2f}  "
                      f"held-out PSNR {held_psnr}")
            ckpt = (args.output_dir / "checkpoints" / splat_filename(dataset.key(i))).with_suffix(".pt")
            runs.append(finetune_segment(model, dataset, i, cfg, show, checkpoint=ckpt))
            if args.save_ply:
                path = args.output_dir / splat_filename(runs[-1].key)
                static = runs[-1].static
                save_splat(path, type(static)(**{k: getattr(static, k).detach().cpu() for k in
                                                 ("means", "quats", "scales", "opacities", "sh")}),
                           comments=[f"evolsplat-finetune {args.steps} steps", f"segment {runs[-1].key}",
                                     "frame: segment frame (vehicle frame at the segment's first frame)"])
    finally:
        dataset.close()
    report = {**finetune_report(runs, cfg), "checkpoint": str(checkpoint) if checkpoint else None,
              "data": str(args.data)}
    save_metrics(report, args.output_dir / "metrics.json")
    save_metrics(psnr_log(runs), args.output_dir / "psnr_log.json")
    if "psnr" in report:
        print(f"{report['num_views']} held-out views: PSNR {report['initial']['psnr']:.2f} -> {report['psnr']:.2f}, "
              f"SSIM {report['initial']['ssim']:.4f} -> {report['ssim']:.4f}")
    print(f"wrote {args.output_dir / 'metrics.json'}, {args.output_dir / 'psnr_log.json'}")
    return report


def entrypoint() -> None:
    """Console script; refusals (existing outputs, bad paths or settings) exit with status 2."""
    from evolsplat_ns._compat.process import prepare_process
    from evolsplat_ns.utils.errors import exit_on_user_error

    prepare_process()
    exit_on_user_error("evolsplat-finetune", main, also=(FileExistsError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    entrypoint()
