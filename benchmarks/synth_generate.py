"""Time the synthetic street generator per ray-casting backend (open3d's Embree vs pure torch).

One scene (bench_setup's 960x640, 12 frames, 1 camera by default) is generated with each backend;
the table gives the wall time, the share spent casting rays (camera + LiDAR first hits and sun
shadow rays) and, against the first backend, the mean absolute image difference.

    python benchmarks/synth_generate.py                                   # open3d and torch on CPU
    python benchmarks/synth_generate.py --backends torch --device cuda    # on the GPU machine

Writes ``OUT/results.json`` (and the scenes under ``OUT/<backend>``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def _timed(counter: dict):
    """Patch ``Raycaster``'s two casting entry points to add their wall time to ``counter["s"]``."""
    from evolsplat_ns.data.synth.sensors import Raycaster

    cast_one, occluded = Raycaster._cast_one, Raycaster.occluded_static

    def timed_cast_one(scene, rays):
        start = time.perf_counter()
        try:
            return cast_one(scene, rays)
        finally:
            counter["s"] += time.perf_counter() - start

    def timed_occluded(self, rays):
        start = time.perf_counter()
        try:
            return occluded(self, rays)
        finally:
            counter["s"] += time.perf_counter() - start

    Raycaster._cast_one = staticmethod(timed_cast_one)
    Raycaster.occluded_static = timed_occluded


def _image_diff(a: Path, b: Path) -> float:
    """Mean absolute difference in grey levels (0-255) over all images of two scene folders."""
    import cv2

    def read(path: Path) -> np.ndarray:
        return cv2.imread(str(path)).astype(np.float64)

    diffs = [np.abs(read(p) - read(b / p.relative_to(a))).mean() for p in sorted((a / "images").glob("*.jpg"))]
    return float(np.mean(diffs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/synth_generate_bench"))
    p.add_argument("--backends", nargs="+", default=["open3d", "torch"], choices=["open3d", "torch"])
    p.add_argument("--device", default="auto", help="torch backend's device (auto, cpu, cuda)")
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args()
    import torch

    from evolsplat_ns.data.synth import SynthConfig, generate_dataset
    from evolsplat_ns.data.synth.sensors import describe_raycaster

    if a.threads:
        torch.set_num_threads(a.threads)
    counter = {"s": 0.0}
    _timed(counter)
    results = []
    for backend in a.backends:
        cfg = SynthConfig(scenes=1, frames=a.frames, cameras=a.cameras, width=a.width, height=a.height,
                          seed=0, raycaster=backend, device=a.device, overwrite=True)
        out = a.out / backend
        shutil.rmtree(out, ignore_errors=True)
        counter["s"] = 0.0
        start = time.perf_counter()
        generate_dataset(cfg, out)
        seconds = time.perf_counter() - start
        row = {"backend": describe_raycaster(backend, a.device), "seconds": round(seconds, 2),
               "raycast_seconds": round(counter["s"], 2), "s_per_frame": round(seconds / a.frames, 3),
               "torch_threads": torch.get_num_threads()}
        if results:
            row["image_mean_abs_diff_vs_first"] = round(_image_diff(a.out / a.backends[0] / "000", out / "000"), 4)
        results.append(row)
        print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    setting = f"{a.width}x{a.height}, {a.frames} frames, {a.cameras} camera(s), default LiDAR and 4 moving cars"
    (a.out / "results.json").write_text(json.dumps({"scene": setting, "results": results}, indent=2))
    print(f"\n{setting}")
    print(f"{'backend':<20}{'total s':>10}{'ray cast s':>12}{'s/frame':>10}")
    for r in results:
        print(f"{r['backend']:<20}{r['seconds']:>10.1f}{r['raycast_seconds']:>12.1f}{r['s_per_frame']:>10.2f}")


if __name__ == "__main__":
    main()
