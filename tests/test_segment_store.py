"""The segment store: one owner of per-segment state, bounded in host memory, spilling to disk,
checkpointed whole; a training run over more segments than the bound resumes exactly."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.data.types import PointCloud, SegmentKey
from evolsplat_ns.model.node import GaussianNode
from evolsplat_ns.model.segment_store import SegmentState, SegmentStore
from tiny_run import lite_trainer


def _state(n: int, seed: int) -> SegmentState:
    g = torch.Generator().manual_seed(seed)
    pc = PointCloud(torch.rand(n, 3, generator=g) * 10, torch.rand(n, 3, generator=g))
    node = GaussianNode.from_point_cloud(pc, scale_init=0.05)
    node.update_offset(torch.arange(n), torch.rand(n, 3, generator=g) * 0.01)
    return SegmentState(node)


def test_bound_spills_least_recently_used_and_reads_back_exactly(tmp_path):
    one = _state(1000, 0).nbytes()
    store = SegmentStore(max_resident_mb=2.5 * one / 2**20, spill_dir=tmp_path / "spill")
    keys = [SegmentKey(f"s{i}", 0) for i in range(5)]
    originals = {}
    for i, key in enumerate(keys):
        originals[key] = {k: v.clone() for k, v in store.put(key, _state(1000, i)).node.state_dict().items()}
        assert store.resident_bytes() <= store.max_resident_bytes
    assert store.resident_keys() == keys[-2:], "the least recently used are spilled first"
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["s0_seg000.pt", "s1_seg000.pt", "s2_seg000.pt"]
    assert len(store) == 5 and set(store.keys()) == set(keys)

    back = store.activate(keys[0], "cpu")  # read back from disk, pinned; the bound holds again
    for name, tensor in originals[keys[0]].items():
        assert torch.equal(getattr(back.node, name), tensor), name
    assert keys[0] in store.resident_keys() and store.resident_bytes() <= store.max_resident_bytes

    saved = store.state_dict()  # every segment, resident and spilled
    assert set(saved) == {str(k) for k in keys}
    other = SegmentStore()
    other.load_state_dict(saved)
    for key in keys:
        for name, tensor in originals[key].items():
            assert torch.equal(getattr(other.get(key).node, name), tensor), (key, name)

    store.forget()
    assert len(store) == 0 and not list((tmp_path / "spill").iterdir())


def test_active_segment_is_pinned(tmp_path):
    one = _state(500, 0).nbytes()
    store = SegmentStore(max_resident_mb=0.5 * one / 2**20, spill_dir=tmp_path)
    a, b = SegmentKey("a", 0), SegmentKey("b", 0)
    store.put(a, _state(500, 0))
    store.activate(a, "cpu")
    store.put(b, _state(500, 1))  # over the bound: b is spilled, never the active a
    assert store.resident_keys() == [a] and b in store
    store.activate(b, "cpu")
    assert store.resident_keys() == [b] and a in store


def test_run_beyond_the_bound_stays_under_it_and_resumes_exactly(tiny_dataset, tmp_path):
    """More segments than fit: resident memory stays under the bound, spill files appear under the
    run folder, and a resumed run continues with the uninterrupted run's loss."""
    bound_mb = 0.1  # one 1500-Gaussian segment (~72 kB) besides the active one

    def bounded(cfg):
        cfg.pipeline.model.segment_store_mb = bound_mb
        ds = cfg.pipeline.datamanager.dataset
        ds.segment_length = ds.segment_stride = 6  # 2 segments per scene, 4 training segments
        ds.iters_per_segment = 1  # a new segment every step

    k, steps = 4, 6
    straight = lite_trainer(tiny_dataset, tmp_path / "a", configure=bounded)
    store = straight.pipeline.model.segments
    losses = []
    for s in range(steps):
        losses.append(float(straight.train_step(s)[0]))
        assert store.resident_bytes() <= bound_mb * 2**20
    assert len(store) >= 3 and store.spills > 0, "the run visited more segments than the bound holds"
    assert list((straight.base_dir / "segments").glob("*.pt")), "spill files live under the run folder"

    first = lite_trainer(tiny_dataset, tmp_path / "b", configure=bounded)
    for s in range(k + 1):
        first.train_step(s)
    first.save_checkpoint(k)
    resumed = lite_trainer(tiny_dataset, tmp_path / "c", load_dir=first.checkpoint_dir, configure=bounded)
    assert set(resumed.pipeline.model.segments.keys()) == set(first.pipeline.model.segments.keys())
    assert float(resumed.train_step(k + 1)[0]) == pytest.approx(losses[k + 1], rel=1e-5)
