"""A training sample's way from the image cache to the model's device: float32 vs uint8 on the host.

The data manager draws each training sample in its prefetch thread, pins it (on a GPU host) and the
model copies it to the device without blocking. Per sample, each route is timed in three parts:

- ``draw``: ``MultiSceneDataset.next_train_sample`` (decoded images come from the image cache after
  the warm-up, so this is stacking, pose maths and, for float32, the conversion of every pixel);
- ``pin``: ``Sample.pin_memory`` (CUDA only; on the CPU a ``clone`` of the sample stands in for the
  page-locked copy, which is what pinning does to memory);
- ``to_device``: both views moved with ``Views.to`` (images float32 there either way), synchronised.

Prints the JSON (``--json FILE`` too) and a table with the host bytes per sample. The two routes
draw the same samples (same seed), alternately, so machine noise falls on both.

    python benchmarks/sample_transport.py --out /tmp/transport --data /tmp/synth   # any drivestudio folder
    python benchmarks/sample_transport.py --out /tmp/transport --width 960 --height 640   # generated
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import add_synth_args, synth_dataset  # noqa: E402

from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig  # noqa: E402
from evolsplat_ns.data.types import Sample  # noqa: E402

ROUTES = {"float32": False, "uint8": True}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pin(sample: Sample, device: torch.device) -> Sample:
    if device.type == "cuda":
        return sample.pin_memory()
    clone = lambda v: v.to_device_fn(torch.clone)  # noqa: E731
    return replace(sample, source=clone(sample.source), target=clone(sample.target))


def _one(ds: MultiSceneDataset, uint8: bool, device: torch.device) -> dict:
    """ms of the three parts for the next sample of ``ds``, and its images' host bytes."""
    t0 = time.perf_counter()
    sample = ds.next_train_sample(uint8_rgb=uint8)
    t1 = time.perf_counter()
    sample = _pin(sample, device)
    t2 = time.perf_counter()
    moved = [v.to(device, non_blocking=True) for v in (sample.source, sample.target)]
    _sync(device)
    t3 = time.perf_counter()
    assert all(v.images.dtype == torch.float32 for v in moved)
    host = sum(v.images.numel() * v.images.element_size() for v in (sample.source, sample.target))
    return {"draw": (t1 - t0) * 1e3, "pin": (t2 - t1) * 1e3, "to_device": (t3 - t2) * 1e3, "host_mb": host / 1e6}


def measure(data: Path, device: torch.device, samples: int, warmup: int, seed: int, sources: int = 3,
            targets: int = 4) -> dict:
    """Median ms per part and host MB per sample, per route (``sources`` + ``targets`` keyframes)."""
    config = MultiSceneDatasetConfig(data=data, seed=seed, preload=False, num_source_keyframes=sources,
                                     num_target_keyframes=targets)
    sets = {name: MultiSceneDataset(config) for name in ROUTES}
    rows: dict[str, list[dict]] = {name: [] for name in ROUTES}
    try:
        for i in range(warmup + samples):
            for name, uint8 in ROUTES.items():
                r = _one(sets[name], uint8, device)
                if i >= warmup:
                    rows[name].append(r)
    finally:
        for ds in sets.values():
            ds.close()
    out = {}
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med["total"] = med["draw"] + med["pin"] + med["to_device"]
        out[name] = {k: round(v, 2) for k, v in med.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a dataset folder (default: the generated OUT/data)")
    add_synth_args(p, width=960, height=640, moving_cars=0, device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sources", type=int, default=3, help="source keyframes (x cameras = source views)")
    p.add_argument("--targets", type=int, default=4, help="target keyframes (x cameras = target views)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4, help="untimed samples per route (fill the image cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = args.data if args.data is not None else synth_dataset(args)
    result = {"data": str(data), "device": str(device), "torch_threads": torch.get_num_threads(),
              "pin": "pin_memory" if device.type == "cuda" else "clone (stand-in: no CUDA)",
              "samples": args.samples, "routes": measure(data, device, args.samples, args.warmup, args.seed,
                                                                 args.sources, args.targets)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(f"\n{'route':8} {'draw ms':>8} {'pin ms':>7} {'to dev ms':>9} {'total ms':>9} {'host MB':>8}")
    for name, r in result["routes"].items():
        print(f"{name:8} {r['draw']:8.2f} {r['pin']:7.2f} {r['to_device']:9.2f} {r['total']:9.2f} {r['host_mb']:8.1f}")


if __name__ == "__main__":
    main()
