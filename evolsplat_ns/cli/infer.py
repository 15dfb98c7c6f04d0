"""``evolsplat-infer``: zero-shot reconstruction and rendering of new scenes with a trained run.

Example::

    evolsplat-infer --load-config outputs/demo/evolsplat-lite/RUN/config.yml --data data/new_scenes \\
        --output-dir renders/zero_shot [--untrained] [--overwrite]

No training on ``--data``: every scene there is an eval scene, read with its own rig (all its
cameras, any number) and with hold-out and source/target selection chosen from the scene itself:
frames held out every ``eval_frame_interval``-th (every 2nd in scenes too short for it), cameras
held out one at a time in one-frame scenes; ``--hold-out``, ``--eval-frame-interval``,
``--eval-cameras``, ``--num-source-keyframes``, ``--cameras`` and ``--segment-length`` override.
Writes ``metrics.json`` (per scene, per camera, mean, LPIPS availability, a ``timing`` block and
a ``selection`` block saying what was chosen per scene), ``grid.png`` (one held-out view per row:
prediction | ground truth | error) and ``camera_path.mp4``: the FRONT camera along the first
scene's ego trajectory (a PNG sequence in ``camera_path/`` when ffmpeg is unavailable).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    """Flags: run, new data, output folder, baseline and output options."""
    parser = argparse.ArgumentParser(prog="evolsplat-infer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True, help="the run's config.yml")
    parser.add_argument("--data", type=Path, required=True, help="folder of new scenes (drivestudio layout)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for metrics, grid and video")
    parser.add_argument("--untrained", action="store_true",
                        help="same architecture with freshly initialised weights (baseline)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--eval-frame-interval", type=int, default=None,
                        help="hold out every k-th frame (default: the run's setting, every 2nd frame in "
                             "scenes too short for it)")
    parser.add_argument("--hold-out", choices=("auto", "frames", "cameras"), default=None,
                        help="what is held out: frames, cameras (each in turn, at every frame) or auto "
                             "(frames; cameras in one-frame scenes)")
    parser.add_argument("--eval-cameras", type=_int_list, default=None,
                        help="comma-separated camera ids held out by --hold-out cameras (default: all)")
    parser.add_argument("--cameras", type=_int_list, default=None,
                        help="comma-separated camera ids to load (default: every camera of --data)")
    parser.add_argument("--num-source-keyframes", type=int, default=None,
                        help="source keyframes per target, each with all cameras (default: the run's, "
                             "capped by the segment)")
    parser.add_argument("--segment-length", type=int, default=None,
                        help="frames per segment, 0 = whole scene (default: the run's)")
    parser.add_argument("--max-grid-rows", type=int, default=8, help="held-out views shown in grid.png")
    parser.add_argument("--video-frames", type=int, default=48,
                        help="poses along the camera path (0 = no video)")
    parser.add_argument("--fps", type=float, default=10.0, help="video frame rate")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated camera ids like 0,3, got {text!r}") from None


def _print_summary(report: dict) -> None:
    m, t = report, report["timing"]
    scores = "  ".join(f"{k} {m[k]:.4f}" for k in ("psnr", "ssim", "lpips", "stlpips") if k in m)
    print(f"{m['num_views']} held-out views ({'untrained' if m['untrained'] else 'trained'} weights): {scores}")
    for name in ("lpips", "stlpips"):
        if not m.get(f"{name}_available", True):
            print(f"  {m[f'{name}_note']}")
    for stage, label in (("encode_ms", "feed-forward reconstruction per segment (encode)"),
                         ("render_ms", "render per frame (predict + rasterise)"),
                         ("rasterize_ms", "rasterise per frame, Gaussians already predicted")):
        print(f"  {label}: mean {t[stage]['mean_ms']:.1f} ms, median {t[stage]['median_ms']:.1f} ms "
              f"over {t[stage]['count']} on {t['device']}")


def main(argv: list[str] | None = None) -> dict:
    """Run zero-shot inference; returns the metrics report (tests call this directly)."""
    from evolsplat_ns.inference.camera_path import ego_camera_path, render_camera_path
    from evolsplat_ns.inference.loading import DatasetOverrides, load_pipeline
    from evolsplat_ns.inference.outputs import InferOutputs, save_grid, save_metrics
    from evolsplat_ns.inference.video import write_video
    from evolsplat_ns.inference.zero_shot import evaluate_zero_shot

    args = build_parser().parse_args(argv)
    outputs = InferOutputs(args.output_dir)
    outputs.claim(args.overwrite)
    overrides = DatasetOverrides(data=args.data, all_scenes_eval=True, eval_frame_interval=args.eval_frame_interval,
                                 hold_out=args.hold_out, eval_cameras=args.eval_cameras, cameras=args.cameras,
                                 num_source_keyframes=args.num_source_keyframes,
                                 segment_length=args.segment_length)
    _, pipeline, checkpoint = load_pipeline(args.load_config, overrides, untrained=args.untrained)
    dataset = pipeline.datamanager.dataset
    try:
        start = time.perf_counter()
        result = evaluate_zero_shot(pipeline, args.max_grid_rows, progress=not args.no_progress)
        save_grid(result.grid_rows, outputs.grid, result.grid_labels)
        video = None
        if args.video_frames > 0:
            path = ego_camera_path(dataset.scenes[0], args.video_frames)
            frames = list(tqdm(render_camera_path(pipeline.model, dataset, 0, path), total=len(path),
                               desc=f"camera path ({dataset.scenes[0].name})", disable=args.no_progress))
            video = write_video(frames, outputs.video, args.fps)
    finally:
        dataset.close()
    report = {**result.metrics, "untrained": args.untrained,
              "checkpoint": str(checkpoint) if checkpoint else None, "data": str(args.data),
              "timing": {**result.timing, "device": str(pipeline.model.device),
                         "total_s": time.perf_counter() - start},
              "grid": str(outputs.grid), "video": str(video) if video else None,
              "selection": {"num_source_keyframes": dataset.config.num_source_keyframes,
                            "segment_length": dataset.config.segment_length,
                            "keyframe_interval": dataset.config.keyframe_interval,
                            "per_scene": dataset.selection_report()}}
    save_metrics(report, outputs.metrics)
    _print_summary(report)
    print(f"wrote {outputs.metrics}, {outputs.grid}" + (f", {video}" if video else ""))
    return report


def entrypoint() -> None:
    """Console script; refusals (existing outputs, bad paths or settings) exit with status 2."""
    from evolsplat_ns._compat.process import prepare_process
    from evolsplat_ns.utils.errors import exit_on_user_error

    prepare_process()  # third-party warnings filtered, ffmpeg on PATH
    exit_on_user_error("evolsplat-infer", main, also=(FileExistsError, FileNotFoundError, ValueError))
