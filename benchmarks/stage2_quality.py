"""Stage 2 on vs off on synthetic streets with noisy boxes (known truth): pose error and image metrics.

Generates scenes with moving cars whose *written* boxes carry noise (true boxes in instances_gt/),
trains ``evolsplat-lite`` (stage 2 off) and ``evolsplat-stage2-lite`` (on), same seed and steps, and
prints, as JSON and a table: the box error of the poses each renders against the true boxes (mean
translation m, rotation deg, over every training segment's actors and valid frames; off = the
noisy boxes themselves), held-out whole-image and dynamic-region PSNR, the flow-warping
temporal error (docs/metrics.md), the depth error on dynamic pixels (abs rel, RMSE in metres,
against the generated true depth maps on the true dynamic mask, undilated), LPIPS only when the
pretrained weights are on disk ("n/a (no pretrained weights)" otherwise), and ms per step.

The error is frame-independent: with T_noisy, T_true the written and true object-to-world boxes,
the rendered pose is T_noisy·Exp(ξ) (in any common frame), so its error is Exp(ξ)⁻¹·T_noisy⁻¹·T_true.

    python benchmarks/stage2_quality.py --out /tmp/s2q --steps 100
    python benchmarks/stage2_quality.py --out /tmp/s2q --steps 600 --width 960 --height 640 --device cuda --full

``--objects-from discovery``: the runs train on a copy of the data without ``instances/`` (stage 2's
flow discovery makes the actors; stage 2 off has none), and the pose error is that of the
discovered tracks against the true boxes they match (:func:`discovery_errors`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from bench_setup import add_synth_args, synth_dataset


def _true_errors(scene_dirs: dict[int, Path]) -> dict[tuple[int, str, int], torch.Tensor]:
    """(scene index, instance id, frame) -> T_noisy⁻¹·T_true [4, 4] from instances/ and instances_gt/."""
    out = {}
    for si, root in scene_dirs.items():
        noisy = json.loads((root / "instances" / "instances_info.json").read_text())
        true = json.loads((root / "instances_gt" / "instances_info.json").read_text())
        for k, info in noisy.items():
            a, b = info["frame_annotations"], true[k]["frame_annotations"]
            tb = dict(zip(b["frame_idx"], b["obj_to_world"]))
            for t, T in zip(a["frame_idx"], a["obj_to_world"]):
                if t in tb:
                    Tn, Tt = torch.tensor(T, dtype=torch.float64), torch.tensor(tb[t], dtype=torch.float64)
                    out[(si, str(k), int(t))] = torch.linalg.inv(Tn) @ Tt
    return out


def _pose_errors(trainer, truth) -> tuple[float, float, int]:
    """Mean translation (m) / rotation (deg) error of the rendered poses against the true boxes."""
    from evolsplat_ns.model.stage2.se3 import so3_log

    pipeline, model = trainer.pipeline, trainer.pipeline.model
    dataset = pipeline.datamanager.dataset
    trans, rot = [], []
    for i in dataset.train_segment_ids:
        pipeline.show_segment(i)
        box = model.context.segment.actors
        if box is None:
            continue
        with torch.no_grad():
            state = model.encode()  # renders refined poses when stage 2 exists (identity before training)
        motion = model.context.segment.motion  # the processor's fit; its box_poses are the data's boxes
        box_poses = (motion.box_poses if motion is not None else box.poses).double()
        poses = state.actor_nodes.poses.double() if state.actor_nodes is not None else box_poses
        correction = torch.linalg.solve(box_poses.cpu(), poses.cpu())  # T_box⁻¹ · T_rendered per actor and frame
        si = dataset.segments[i].scene_index
        for row, inst in enumerate(box.ids):
            for f, t in enumerate(box.frames.tolist()):
                if bool(box.valid[row, f]) and (si, inst, t) in truth:
                    err = torch.linalg.solve(correction[row, f], truth[(si, inst, t)])
                    trans.append(float(err[:3, 3].norm()))
                    rot.append(float(so3_log(err[:3, :3]).norm()) * 180 / math.pi)
    n = len(trans)
    return (sum(trans) / n if n else math.nan, sum(rot) / n if n else math.nan, n)


def dynamic_depth_errors(view, scene) -> Optional[tuple[float, float, int]]:
    """(sum of |d - d_true| / d_true, sum of (d - d_true)², pixels) of a held-out view's rendered
    depth over its true dynamic mask where the generated true depth is > 0 (None without pixels)."""
    t = view.sample.target
    if t.dynamic_masks is None:
        return None
    frame, cam = int(t.frame_ids[view.view]), int(t.cam_ids[view.view])
    true = scene._load_depth(frame, cam, (t.width, t.height)).to(view.outputs["depth"].device)
    mask = t.dynamic_masks[view.view].to(true.device) & (true > 0)
    if not bool(mask.any()):
        return None
    d, g = view.outputs["depth"][..., 0][mask].float(), true[mask]
    return float(((d - g).abs() / g).sum()), float(((d - g) ** 2).sum()), int(mask.sum())


def held_out_metrics(trainer) -> dict:
    """The held-out metrics (``evaluate_held_out``) plus the depth error on dynamic pixels, pooled
    over every dynamic pixel of every held-out view."""
    from evolsplat_ns.engine.evaluation import evaluate_held_out

    pipeline = trainer.pipeline
    dataset = pipeline.datamanager.dataset
    sums = [0.0, 0.0, 0]

    def on_view(view):
        scene = dataset.scenes[dataset.segments[dataset.segment_index(view.sample.key)].scene_index]
        if (e := dynamic_depth_errors(view, scene)) is not None:
            sums[0], sums[1], sums[2] = sums[0] + e[0], sums[1] + e[1], sums[2] + e[2]

    metrics = evaluate_held_out(pipeline.model, pipeline.datamanager, on_view)
    if sums[2]:
        metrics["depth_abs_rel_dynamic"] = sums[0] / sums[2]
        metrics["depth_rmse_dynamic_m"] = math.sqrt(sums[1] / sums[2])
    return metrics


RUNS = {
    "stage2_off": None,
    "stage2_on": {},  # defaults: dataset flow + depth increments and the constant-velocity prior
    "stage2_on_flow_only": {"motion_prior_sigma_m": 0.0, "motion_prior_sigma_deg": 0.0},
    "stage2_on_prior_only": {"use_optical_flow_aggregation": False},
    "stage2_on_no_processor": {"use_optical_flow_aggregation": False, "motion_prior_sigma_m": 0.0,
                               "motion_prior_sigma_deg": 0.0},
}
"""Named runs: None = evolsplat-lite (stage 2 off); a dict = evolsplat-stage2-lite with these stage-2 settings."""


def hide_boxes(data: Path) -> Path:
    """A copy of ``data`` (next to it, made once) whose scenes' ``instances/`` are moved to
    ``instances_hidden/`` (the truth, with ``instances_gt/`` when the boxes are noisy): no box tracks."""
    import shutil

    hidden = data.with_name(data.name + "_no_boxes")
    if not hidden.exists():
        shutil.copytree(data, hidden)
        for scene in sorted(p for p in hidden.iterdir() if (p / "instances").is_dir()):
            shutil.move(scene / "instances", scene / "instances_hidden")
    return hidden


def discovery_errors(trainer, match_m: float = 3.0) -> dict:
    """Discovered tracks against the true boxes (``instances_gt/`` or ``instances_hidden/``), over
    the training segments: each track is matched to the true instance nearest its rendered centre on
    most of its frames (farther than ``match_m`` m on average: a false track). Reports the mean
    translation (m) / rotation (deg) error of the rendered poses, the translation error after each
    track's one constant offset in its object frame (a car seen only from behind has an unseen
    length, so its box frame sits off the true centre by a constant), recall of the true moving
    instances seen on ≥ 3 frames, and false tracks."""
    import numpy as np

    from evolsplat_ns.model.stage2.se3 import so3_log

    pipeline, model = trainer.pipeline, trainer.pipeline.model
    dataset = pipeline.datamanager.dataset
    trans, rot, aligned, found, wanted, false = [], [], [], 0, 0, 0
    for i in dataset.train_segment_ids:
        seg = dataset.segments[i]
        scene = dataset.scenes[seg.scene_index]
        root = Path(scene.layout.root)
        path = root / "instances_gt" / "instances_info.json"
        info = json.loads((path if path.is_file() else root / "instances_hidden" / "instances_info.json").read_text())
        seg_from_world = np.linalg.inv(scene.ego_to_world[seg.frames[0]])
        true = {k: {t: seg_from_world @ np.array(T) for t, T in zip(v["frame_annotations"]["frame_idx"],
                                                                    v["frame_annotations"]["obj_to_world"])
                    if t in seg.frames} for k, v in info.items()}
        moving = {k for k, b in true.items() if len(b) >= 3 and np.linalg.norm(
            np.ptp(np.stack([T[:3, 3] for T in b.values()]), 0)) > 0.5}
        wanted += len(moving)
        pipeline.show_segment(i)
        actors = model.context.segment.actors
        if actors is None:
            continue
        with torch.no_grad():
            state = model.encode()
        poses = (state.actor_nodes.poses if state.actor_nodes is not None else actors.poses).double().cpu()
        matched = set()
        for row in range(actors.num_actors):
            frames = [(f, t) for f, t in enumerate(actors.frames.tolist()) if bool(actors.valid[row, f])]
            votes = {}
            for f, t in frames:
                d = {k: np.linalg.norm(b[t][:2, 3] - poses[row, f, :2, 3].numpy()) for k, b in true.items() if t in b}
                if d:
                    k = min(d, key=d.get)
                    votes.setdefault(k, []).append(d[k])
            if not votes:
                false += 1
                continue
            k = max(votes, key=lambda v: len(votes[v]))
            if np.mean(votes[k]) > match_m:
                false += 1
                continue
            matched.add(k)
            local = []
            for f, t in frames:
                if t in true[k]:
                    err = torch.linalg.solve(poses[row, f], torch.from_numpy(true[k][t]))  # T_rendered⁻¹ · T_true
                    trans.append(float(err[:3, 3].norm()))
                    rot.append(float(so3_log(err[:3, :3]).norm()) * 180 / math.pi)
                    local.append(err[:3, 3])
            offset = torch.stack(local).mean(0)
            aligned += [float((x - offset).norm()) for x in local]
        found += len(matched & moving)
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {"pose_err_trans_m": mean(trans), "pose_err_rot_deg": mean(rot), "pose_err_trans_aligned_m": mean(aligned),
            "pose_samples": len(trans), "discovery_recall": found / wanted if wanted else math.nan,
            "discovery_false_tracks": false}


def run(data: Path, out: Path, stage2: Optional[dict], steps: int, device: str, mode: str, lr: float,
        name: str, full: bool = False, objects_from: str = "boxes") -> dict:
    from dataclasses import replace

    from evolsplat_ns import method_configs as mc

    torch.manual_seed(0)
    if full:  # the full methods (GPU); stage 2 from step 0 every other step, as the lite one
        cfg = mc.evolsplat_stage2_config() if stage2 is not None else mc.evolsplat_config()
        if stage2 is not None:
            stage2 = {"start_step": 0, "stage2_frequency": 2, **stage2}
    else:
        cfg = mc.evolsplat_stage2_lite_config() if stage2 is not None else mc.evolsplat_lite_config()
    cfg.data = cfg.pipeline.datamanager.data = data
    cfg.pipeline.datamanager.dataset.preload = False
    cfg.output_dir, cfg.timestamp, cfg.vis = out, name, "tensorboard"
    cfg.machine.device_type = device
    cfg.max_num_iterations = steps
    if stage2 is not None:
        cfg.pipeline.model.stage2 = replace(cfg.pipeline.model.stage2, stage2_training_mode=mode,
                                            stage2_learning_rate=lr, **stage2)
        cfg.optimizers["stage2"]["optimizer"].lr = lr
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    start = time.perf_counter()
    for step in range(steps):
        trainer.train_step(step)
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    scenes = {si: Path(s.layout.root) for si, s in enumerate(trainer.pipeline.datamanager.dataset.scenes)}
    if objects_from == "discovery":
        found = discovery_errors(trainer)
        trans, rot, n = found.pop("pose_err_trans_m"), found.pop("pose_err_rot_deg"), found.pop("pose_samples")
    else:
        found = {}
        trans, rot, n = _pose_errors(trainer, _true_errors(scenes))
    metrics = held_out_metrics(trainer)
    stats = trainer.pipeline.stage2_controller.get_statistics() if stage2 is not None else {}
    trainer.pipeline.datamanager.dataset.close()
    keys = ("psnr", "psnr_dynamic", "temporal_warp_error", "depth_abs_rel_dynamic", "depth_rmse_dynamic_m")
    lpips = metrics["lpips"] if metrics.get("lpips_available") and "lpips" in metrics else "n/a (no pretrained weights)"
    return {"pose_err_trans_m": trans, "pose_err_rot_deg": rot, "pose_samples": n, **found,
            **{k: metrics[k] for k in keys if k in metrics}, "lpips": lpips, "ms_per_step": 1e3 * train_s / steps,
            **({"stage2_runs": stats["runs"], "stage2_calls": stats["calls"],
                "applied_corr_m": stats["pose_corr_trans_m_avg"]} if stage2 is not None else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_synth_args(p, width=96, height=64, moving_cars=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--mode", default="joint", choices=["joint", "gaussian_only", "pose_only"])
    p.add_argument("--lr", type=float, default=1e-4, help="stage-2 learning rate")
    p.add_argument("--full", action="store_true", help="the full evolsplat / evolsplat-stage2 methods (GPU)")
    p.add_argument("--runs", nargs="+", default=["stage2_off", "stage2_on"], choices=list(RUNS),
                   help="which named runs (RUNS in this file)")
    p.add_argument("--objects-from", default="boxes", choices=["boxes", "discovery"],
                   help="discovery: train without instances/ (stage 2's flow discovery), errors vs the true boxes")
    a = p.parse_args()
    data = synth_dataset(a)
    if a.objects_from == "discovery":
        data = hide_boxes(data)
    results = {name: run(data, a.out / "runs", RUNS[name], a.steps, a.device, a.mode, a.lr, name, a.full,
                         a.objects_from) for name in a.runs}
    print(json.dumps(results, indent=2))
    keys = sorted({k for r in results.values() for k in r})
    print(f"{'metric':<22}" + "".join(f"{n:>14}" for n in results))
    for k in keys:
        print(f"{k:<22}" + "".join(_cell(results[n].get(k, float("nan"))) for n in results))


def _cell(value) -> str:
    return f"{value:>14.4g}" if isinstance(value, (int, float)) else f"  {value}"


if __name__ == "__main__":
    main()
