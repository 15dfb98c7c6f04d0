"""Convert Waymo Open Dataset v1 segments (TFRecord files) into drivestudio scene folders.

One segment file -> one scene folder ``out/NNN`` holding exactly the layout of
:mod:`evolsplat_ns.data.layout`: original JPEGs, intrinsics, extrinsics (Waymo camera axes),
ego poses, LiDAR (when the record has range images), instances and dynamic masks. Sky masks
need a segmentation model and are not produced.

Resuming: a scene folder is complete when its marker file ``.done`` exists (written last).
Complete folders are skipped; incomplete ones are refused; both are replaced only with
``overwrite``. ``out/scene_map.json`` records which segment file went to which folder.

Build, then swap: a scene is converted into ``out/.staging/NNN.PID`` and renamed into place only
when complete, so a failing source (a corrupt TFRecord) never costs the existing folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from evolsplat_ns.data import layout
from evolsplat_ns.data.waymo.boxes import MASK_GROUPS, InstanceTable, dynamic_mask
from evolsplat_ns.data.waymo.frame import FrameData, parse_frame
from evolsplat_ns.data.waymo.range_image import frame_point_table
from evolsplat_ns.data.waymo.tfrecord import read_records

DONE_MARKER = ".done"
SCENE_MAP = "scene_map.json"
STAGING = ".staging"
SKY_MASK_NOTE = ("note: sky_masks/ are not produced (they need a segmentation model); "
                 "run a sky segmenter over images/ to add them")


@dataclass
class SegmentJob:
    """One segment file and the scene folder it converts into."""

    source: Path
    scene: str
    out_root: Path

    @property
    def scene_dir(self) -> Path:
        return self.out_root / self.scene

    @property
    def staging_dir(self) -> Path:
        """Where the scene is built before it replaces ``scene_dir`` (same file system: atomic rename)."""
        return self.out_root / STAGING / f"{self.scene}.{os.getpid()}"


@dataclass
class SegmentResult:
    """What happened to one job: status is converted, skipped or failed."""

    scene: str
    source: str
    status: str
    segment: str = ""
    frames: int = 0
    lidar_points: int = 0
    seconds: float = 0.0
    message: str = ""


# ----------------------------------------------------------------------------- planning


def find_sources(paths: list[str | os.PathLike]) -> list[Path]:
    """Segment files from files and folders (``*.tfrecord`` inside folders), sorted by name."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.tfrecord"))
            if not found:
                raise FileNotFoundError(f"{p}: folder holds no *.tfrecord files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder (--source)")
    return sorted(set(files), key=lambda f: (f.name, str(f)))


def plan_jobs(sources: list[Path], out_root: Path, scenes: list[int] | None = None) -> list[SegmentJob]:
    """Jobs for the sorted ``sources``; folder ``NNN`` is the index in that order.

    ``scenes`` picks indices into the sorted list (all if None).
    """
    indices = range(len(sources)) if scenes is None else scenes
    bad = [i for i in indices if not 0 <= i < len(sources)]
    if bad:
        raise ValueError(f"--scenes {bad} out of range: {len(sources)} segment files found (indices "
                         f"0..{len(sources) - 1} in sorted file-name order)")
    return [SegmentJob(sources[i], f"{i:03d}", out_root) for i in dict.fromkeys(indices)]


def scene_state(scene_dir: Path) -> str:
    """absent, complete (marker present) or incomplete (folder without marker)."""
    if not scene_dir.exists():
        return "absent"
    return "complete" if (scene_dir / DONE_MARKER).is_file() else "incomplete"


def read_scene_map(out_root: Path) -> dict[str, dict]:
    path = out_root / SCENE_MAP
    return layout.read_json(path) if path.is_file() else {}


def update_scene_map(out_root: Path, result: SegmentResult) -> None:
    """Add one converted scene to ``scene_map.json`` (other entries kept; atomic replace)."""
    scene_map = read_scene_map(out_root)
    scene_map[result.scene] = {"segment": result.segment, "source": result.source}
    tmp = out_root / f".{SCENE_MAP}.tmp"
    tmp.write_text(json.dumps(dict(sorted(scene_map.items())), indent=1))
    os.replace(tmp, out_root / SCENE_MAP)


def check_job(job: SegmentJob, overwrite: bool, scene_map: dict[str, dict]) -> SegmentResult | None:
    """A skipped/failed result if the job must not run; None if it may (after any replacement).

    With ``overwrite`` the returned None means go ahead: the existing folder is replaced only once
    the new one is complete (:func:`convert_segment`).
    """
    state = scene_state(job.scene_dir)
    if state == "absent":
        return None
    recorded = scene_map.get(job.scene, {}).get("source")
    if overwrite:
        print(f"--overwrite: replacing {state} scene {job.scene_dir} "
              f"(was {recorded or 'unknown source'}) with {job.source.name} once it is converted")
        return None
    base = SegmentResult(job.scene, job.source.name, "failed")
    if recorded is not None and recorded != job.source.name:
        base.message = (f"{job.scene_dir} holds {recorded}, but {job.source.name} sorts to index "
                        f"{job.scene} now (source files changed?); use --scenes, another --out, or --overwrite")
        return base
    if state == "complete":
        base.status, base.message = "skipped", "already complete"
        return base
    base.message = (f"{job.scene_dir} exists but is incomplete (no {DONE_MARKER}; an interrupted run?); "
                    "rerun with --overwrite to replace it")
    return base


# ----------------------------------------------------------------------------- writing


def write_calibration(scene: layout.SceneLayout, frame: FrameData) -> None:
    """intrinsics/{cam}.txt and extrinsics/{cam}.txt (camera-to-vehicle, Waymo axes) from one frame."""
    for name, cam in frame.cameras.items():
        layout.write_intrinsics(scene.intrinsics_path(name - 1), cam.intrinsics)
        layout.write_matrix4(scene.extrinsics_path(name - 1), cam.extrinsic)


def write_frame(scene: layout.SceneLayout, t: int, frame: FrameData) -> int:
    """Images, ego pose, LiDAR and dynamic masks of frame ``t``; returns the LiDAR point count."""
    for name, cam in frame.cameras.items():
        layout.write_bytes(scene.image_path(t, name - 1), cam.jpeg)
        for group, classes in MASK_GROUPS.items():
            layout.write_mask(scene.dynamic_mask_path(t, name - 1, group),
                              dynamic_mask(frame.labels, cam, classes))
    layout.write_matrix4(scene.ego_pose_path(t), frame.pose)
    if not frame.lasers:
        return 0
    points = frame_point_table(frame)
    layout.write_lidar(scene.lidar_path(t), points)
    return len(points)


def convert_segment(job: SegmentJob) -> SegmentResult:
    """Convert one segment file into ``job.scene_dir``: built in ``job.staging_dir`` (the ``.done``
    marker written last), then swapped in; on failure the staging folder goes and any existing
    scene folder stays as it was."""
    shutil.rmtree(job.staging_dir, ignore_errors=True)
    try:
        result = _convert_into(job, job.staging_dir)
        _swap_in(job.staging_dir, job.scene_dir)
    finally:
        shutil.rmtree(job.staging_dir, ignore_errors=True)
    return result


def _swap_in(built: Path, target: Path) -> None:
    """Replace ``target`` by the folder ``built``: the old folder is moved aside, then deleted."""
    old = built.with_name(built.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(built, target)
    shutil.rmtree(old, ignore_errors=True)


def _convert_into(job: SegmentJob, root: Path) -> SegmentResult:
    t0 = time.perf_counter()
    scene = layout.SceneLayout(root=root, frames=[], cameras=[])
    instances = InstanceTable()
    result = SegmentResult(job.scene, job.source.name, "converted")
    cameras: set[int] | None = None
    for t, record in enumerate(read_records(job.source)):
        frame = parse_frame(record, f"{job.source} record {t}")
        if cameras is None:
            cameras = set(frame.cameras)
            write_calibration(scene, frame)
            result.segment = frame.segment
        elif set(frame.cameras) != cameras:
            raise ValueError(f"{job.source} record {t}: cameras {sorted(frame.cameras)} differ from "
                             f"the first frame's {sorted(cameras)}")
        result.lidar_points += write_frame(scene, t, frame)
        instances.add_frame(t, frame.labels, frame.pose)
        result.frames = t + 1
    if result.frames == 0:
        raise ValueError(f"{job.source}: no records (empty file)")
    info, frame_instances = instances.to_json()
    layout.write_json(scene.instances_info_path, info)
    layout.write_json(scene.frame_instances_path, frame_instances)
    result.seconds = time.perf_counter() - t0
    layout.write_json(root / DONE_MARKER, asdict(result))
    return result


def _run_one(job: SegmentJob) -> SegmentResult:
    """Worker entry: a failure becomes a failed result instead of killing the pool."""
    try:
        return convert_segment(job)
    except Exception as e:  # noqa: BLE001 - reported per segment, the run goes on
        return SegmentResult(job.scene, job.source.name, "failed", message=f"{type(e).__name__}: {e}")


def run_jobs(
    jobs: list[SegmentJob], workers: int = 1, overwrite: bool = False,
    progress: Callable[[Iterator[SegmentResult], int], Iterator[SegmentResult]] | None = None,
) -> list[SegmentResult]:
    """Convert ``jobs`` (skipping or refusing existing folders, see :func:`check_job`).

    Segments run in ``workers`` processes; ``progress`` wraps the result stream (e.g. tqdm).
    ``scene_map.json`` is updated in this process as each segment completes.
    """
    if not jobs:
        return []
    out_root = jobs[0].out_root
    out_root.mkdir(parents=True, exist_ok=True)
    scene_map = read_scene_map(out_root)
    results, todo = [], []
    for job in jobs:
        verdict = check_job(job, overwrite, scene_map)
        (results if verdict else todo).append(verdict or job)
    stream: Iterator[SegmentResult]
    if workers > 1 and len(todo) > 1:
        pool = get_context("spawn").Pool(min(workers, len(todo)))
        stream = pool.imap_unordered(_run_one, todo)
    else:
        pool, stream = None, map(_run_one, todo)
    try:
        for result in (progress(stream, len(todo)) if progress else stream):
            if result.status == "converted":
                update_scene_map(out_root, result)
            results.append(result)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return sorted(results, key=lambda r: r.scene)
