"""The benchmarks' profile arithmetic: GPU idle time attributed to the phase the host was in."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from evolsplat_ns.utils.timing import PHASE_PREFIX, phase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_throughput import _union_us, device_events, idle_by_phase  # noqa: E402


def _event(name: str, device: DeviceType, start: float, end: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_phases_are_profiler_ranges_only_under_a_profiler():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase("volume"):
            torch.ones(3).sum()
    assert PHASE_PREFIX + "volume" in {e.name for e in prof.events()}
    with phase("volume"):  # no profiler: a plain context, nothing recorded or raised
        pass


def test_idle_gaps_go_to_the_innermost_phase_covering_them():
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [
        _event("k1", cuda, 0, 10), _event("k2", cuda, 5, 20),   # overlapping: busy 0-20
        _event("k3", cuda, 30, 40),                             # gap 20-30
        _event("k4", cuda, 60, 70),                             # gap 40-60
        _event(PHASE_PREFIX + "heads", cpu, 15, 50),            # outer: 20-25 and 40-50 of the gaps
        _event(PHASE_PREFIX + "render", cpu, 25, 35),           # inner: 25-30 of the first gap
        _event("aten::add", cpu, 22, 23),                       # not a phase: ignored
        _event(PHASE_PREFIX + "heads", cuda, 15, 50),           # the range's GPU shadow: not GPU work
    ]
    assert _union_us([(e.time_range.start, e.time_range.end) for e in device_events(events)]) == 40
    idle = idle_by_phase(events, iters=1)
    # us -> ms; 50-60 is outside every phase
    assert idle == {"heads": 0.015, "render": 0.005, "(none)": 0.01}
    assert idle_by_phase(events, iters=5)["heads"] == 0.003  # per step


def test_sample_transport_times_both_routes_on_the_same_samples(tiny_dataset):
    """benchmarks/sample_transport.py: both routes run, and a uint8 sample holds a quarter of the
    float32 one's image bytes (3 source + 1 target keyframes x 3 cameras at 64x48)."""
    from sample_transport import measure

    routes = measure(tiny_dataset, torch.device("cpu"), samples=2, warmup=1, seed=0, sources=3, targets=1)
    views = (3 + 1) * 3
    assert routes["float32"]["host_mb"] == round(views * 64 * 48 * 3 * 4 / 1e6, 2)
    assert routes["uint8"]["host_mb"] == round(views * 64 * 48 * 3 / 1e6, 2)
    assert all(r["total"] > 0 for r in routes.values())
