"""Scene-sharded data parallel on CPU with gloo (docs/distributed.md).

One real 2-process run (``torchrun ... evolsplat-train evolsplat-lite``, CPU, gloo) is shared by
the module: it starts from a one-process checkpoint and trains steps 1..K. A single process then
replays the union of the two ranks' samples (each rank's shard, drawn from the same per-rank
streams) with the loss of each sample divided by the world size, and must reach the same weights.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evolsplat_ns.data.sharding import Shard, assign_segments, owner_of, shard_seed
from tiny_run import lite_trainer

REPO = Path(__file__).resolve().parents[1]
K = 3
"""Steps of the 2-rank run (1..K, after the starting checkpoint of step 0)."""
CLIP = 0.05
"""Gradient clip small enough to be active, so clipping after (not before) the all-reduce is tested."""
ADAM_EPS = 1e-6
ATOL = 1e-5
"""Weights of the 2-rank run vs the one-process union run (the two sum the same per-target gradients
in another order; measured 6e-8 after 3 steps with ADAM_EPS 1e-6, 6.5e-3 with the all-reduce's
average off by a factor 1.5)."""


# ----------------------------------------------------------------------------- sharding rule

def test_sharding_is_balanced_deterministic_and_complete():
    keys = [f"{s:03d}/seg{i:03d}" for s in range(7) for i in range(5)]  # 35 segments
    for world in (1, 2, 3, 4, 8):
        shards = assign_segments(keys, world, seed=0)
        flat = sorted(i for part in shards for i in part)
        assert flat == list(range(len(keys))), "every segment is assigned exactly once"
        sizes = [len(p) for p in shards]
        assert max(sizes) - min(sizes) <= 1, f"balanced by count at world size {world}: {sizes}"
        assert assign_segments(list(reversed(keys)), world, 0) == [
            sorted(len(keys) - 1 - i for i in part) for part in shards], "a function of the key set, not its order"
    assert assign_segments(keys, 4, 0) == assign_segments(keys, 4, 0)
    assert assign_segments(keys, 4, 0) != assign_segments(keys, 4, 1), "seeded"
    two, three = owner_of(keys, 2, 0), owner_of(keys, 3, 0)
    assert set(three.values()) == {0, 1, 2} and two != three, "a new world size gives a new assignment"
    assert assign_segments(keys, 1, 0) == [list(range(len(keys)))], "one process trains everything in order"


def test_sharding_refuses_more_ranks_than_segments():
    from evolsplat_ns.utils.errors import UserError

    with pytest.raises(UserError, match="2 training segment.*4 ranks.*fewer processes"):
        assign_segments(["000/seg000", "001/seg000"], 4)
    assert shard_seed(5, Shard()) == 5 and shard_seed(5, Shard(1, 2)) == [5, 1, 2]


# ----------------------------------------------------------------------------- a dead rank

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_peers(mode: str, timeout_s: float) -> list[dict]:
    """Run tests/distributed_peer.py as ranks 0 and 1 of a gloo job: each rank's JSON line (rank 1
    only for ``average``; a hung or dead rank 1 is killed once rank 0 has answered)."""
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    peer, port = Path(__file__).with_name("distributed_peer.py"), _free_port()
    procs = [subprocess.Popen([sys.executable, str(peer), str(r), str(port), str(timeout_s), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    try:
        for p in procs if mode == "average" else procs[:1]:
            out, err = p.communicate(timeout=120)
            lines = out.strip().splitlines()
            results.append(json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"stderr": err[-3000:]})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def test_gradients_are_averaged_in_one_all_reduce():
    """Mean over ranks (a missing gradient counts as zero); None where no rank has one; buffers
    averaged; the same on both ranks."""
    for result in _two_peers("average", 60.0):
        assert result.get("both") == [1.5] * 3, result
        assert result["rank1_only"] == [2.0] * 3 and result["neither"] is True and result["buffer"] == [1.0]


@pytest.mark.parametrize("mode", ["hung", "dead"])
def test_dead_or_hung_rank_ends_the_job_within_the_timeout(mode):
    """Rank 1 hangs or dies after one all-reduce; rank 0's next one raises within the timeout,
    naming the operation and what to do (tests/distributed_peer.py)."""
    timeout_s = 4.0
    result = _two_peers(mode, timeout_s)[0]
    assert "message" in result, result
    message = result["message"]
    assert result["waited"] <= timeout_s + 5, f"rank 0 waited {result['waited']:.1f} s with a {timeout_s} s timeout"
    assert "rank 0 of 2" in message and "the gradient all-reduce of step 7" in message, message
    assert "--distributed-timeout" in message and "--load-dir" in message, message


# ----------------------------------------------------------------------------- a 2-rank run

def _settings(cfg) -> None:
    cfg.gradient_clip_val = CLIP
    for opt in cfg.optimizers.values():
        opt["optimizer"].max_norm = CLIP
        # The methods' Adam eps (1e-15) turns a gradient entry that is pure rounding noise (~1e-12,
        # e.g. a sparse-conv weight no voxel pattern reaches) into a full-lr step whose sign follows
        # the noise, so two equal sums in another order could differ by 2 lr. An eps above the
        # noise keeps such entries still, and the comparison then tests the all-reduce, not the
        # noise (torch's default 1e-8 let a change of the heads' summation order reach 4.6e-5 in
        # the U-Net's deepest weights).
        opt["optimizer"].eps = ADAM_EPS
    # Likewise the voxel set: rebuilt every step, the two runs' per-rank gradients agree to the last
    # bits. With the default lag (4) they reach a trajectory where rounding grows to ~2.5e-5 in the
    # U-Net's weights (as much as the union run with its two samples swapped differs by, at either
    # setting), which would hide what this compares: the all-reduce.
    cfg.pipeline.model.volume_refresh_every = 1


@pytest.fixture(scope="module")
def two_rank_run(tiny_dataset, tmp_path_factory):
    """(step-0 checkpoint folder, 2-rank run folder): the 2-rank run resumed from that step-0
    checkpoint (same starting weights as any one-process run from it) and trained steps 1..K."""
    root = tmp_path_factory.mktemp("ddp")
    init = lite_trainer(tiny_dataset, root / "init", experiment="init", configure=_settings)
    init.save_checkpoint(0)
    init.pipeline.datamanager.dataset.close()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "evolsplat_ns.cli.train", "evolsplat-lite",
           "--data", str(tiny_dataset), "--output-dir", str(root / "ddp"), "--experiment-name", "ddp",
           "--timestamp", "run", "--max-num-iterations", str(K), "--load-dir", str(init.checkpoint_dir),
           "--machine.device-type", "cpu", "--vis", "tensorboard", "--gradient-clip-val", str(CLIP),
           "--distributed-timeout", "120", "--pipeline.model.max-gaussians-per-segment", "1500",
           "--pipeline.datamanager.dataset.preload", "False", "--pipeline.model.volume-refresh-every", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return init.checkpoint_dir, root / "ddp" / "ddp" / "evolsplat-lite" / "run"


def _union_run(tiny_dataset, out: Path, init_dir: Path, steps: range, world: int = 2):
    """One process from ``init_dir``: each step draws every rank's next sample from that rank's
    shard and stream, back-propagates each sample's loss / world, clips, steps once, commits every
    sample's offsets. Returns the trainer and the per-rank datasets."""
    from evolsplat_ns.data.dataset import MultiSceneDataset

    trainer = lite_trainer(tiny_dataset, out, load_dir=init_dir, configure=_settings)
    model = trainer.pipeline.model
    ranks = [MultiSceneDataset(trainer.config.pipeline.datamanager.dataset, Shard(r, world)) for r in range(world)]
    for step in steps:
        trainer.optimizers.zero_grad_all()
        model.step = step
        results = []
        for ds in ranks:
            sample = ds.next_train_sample()
            pc = ds.point_cloud(ds.segment_index(sample.key))
            results.append(model.sample_loss(sample, pc, step, backward=lambda loss: (loss / world).backward()))
        trainer.optimizers.optimizer_scaler_step_all(trainer.grad_scaler)
        trainer.optimizers.scheduler_step_all(step)
        for r in results:
            r.state.node.update_offset(r.projected_index, r.state.offset.detach()[r.projected_index])
    return trainer, ranks


def _checkpoint(run_dir: Path) -> dict:
    from evolsplat_ns.engine import checkpoints

    return checkpoints.newest_loadable_checkpoint(run_dir / "nerfstudio_models")[1]


@pytest.fixture(scope="module")
def union_run(two_rank_run, tiny_dataset, tmp_path_factory):
    init_dir, _ = two_rank_run
    return _union_run(tiny_dataset, tmp_path_factory.mktemp("union"), init_dir, range(1, K + 1))


def test_two_ranks_equal_one_process_over_the_union_of_their_samples(two_rank_run, union_run):
    _, run_dir = two_rank_run
    trainer, _ = union_run
    state = _checkpoint(run_dir)
    assert state["step"] == K and state["distributed"] == {"world_size": 2}
    weights = {k[len("_model."):]: v for k, v in state["pipeline"].items() if k.startswith("_model.")}
    reference = dict(trainer.pipeline.model.named_parameters())
    assert len(reference) > 10 and all(k in weights for k in reference)
    differ = float(torch.cat([(weights[k] - p.detach()).flatten() for k, p in reference.items()]).abs().max())
    print(f"max |2-rank weights - union-run weights| after {K} steps: {differ:.3e}")
    assert differ <= ATOL, f"2-rank weights differ from the union run by {differ:.2e}"
    init = _checkpoint(two_rank_run[0].parent)
    changed = [k for k in reference if not torch.equal(init["pipeline"]["_model." + k], weights[k])]
    assert len(changed) > 10, "the run trained (the weights moved from the starting checkpoint)"


def test_checkpoint_holds_both_ranks_segments_and_streams(two_rank_run, union_run):
    _, run_dir = two_rank_run
    trainer, ranks = union_run
    state = _checkpoint(run_dir)
    segments = state["pipeline"]["_model._extra_state"]["segments"]
    owned = [str(ds.key(i)) for ds in ranks for i in ds.train_segment_ids]
    assert len(owned) == 2 and set(owned) <= set(segments), f"both ranks' segments in one file: {list(segments)}"
    store = trainer.pipeline.model.segments
    for key in owned:  # each rank's offset cache, trained K steps, equals the union run's
        offset = segments[key]["node"]["offset"]
        assert offset.abs().sum() > 0, f"{key}: its rank's offsets were committed"
        from evolsplat_ns.data.types import SegmentKey

        torch.testing.assert_close(offset, store.get(SegmentKey.parse(key)).node.offset, atol=ATOL, rtol=0)
    streams = state["pipeline"]["datamanager._extra_state"]
    assert streams["world_size"] == 2 and len(streams["streams"]) == 2
    for ds, saved in zip(ranks, streams["streams"]):  # each rank's stream is where the union run's is
        assert saved["scheduler"]["iteration_on_segment"] == ds.scheduler.state_dict()["iteration_on_segment"]
        assert saved["rng"] == ds.rng.bit_generator.state


def test_resume_with_one_process_from_a_two_rank_checkpoint(two_rank_run, union_run, tiny_dataset, tmp_path):
    """World size 1 from the 2-rank checkpoint of step K holds what the 2 ranks held: on each rank's
    step-K+1 sample (drawn from that rank's stream as saved) its loss is the union run's at step K+1."""
    from evolsplat_ns.data.dataset import MultiSceneDataset

    _, run_dir = two_rank_run
    union, ranks = union_run
    resumed = lite_trainer(tiny_dataset, tmp_path / "one", load_dir=run_dir / "nerfstudio_models", configure=_settings)
    assert resumed._start_step == K + 1
    model = resumed.pipeline.model
    owned = {ds.key(i) for ds in ranks for i in ds.train_segment_ids}
    assert owned <= set(model.segments.keys()), "one process loads every rank's segments"
    streams = _checkpoint(run_dir)["pipeline"]["datamanager._extra_state"]["streams"]
    for r, ds in enumerate(ranks):
        again = MultiSceneDataset(resumed.config.pipeline.datamanager.dataset, Shard(r, 2))
        again.load_state_dict(streams[r])
        sample, expected = again.next_train_sample(), ds.next_train_sample()
        assert sample.key == expected.key and torch.equal(sample.target.frame_ids, expected.target.frame_ids)
        with torch.no_grad():  # train mode: BatchNorm normalises by the batch, as the training step does
            got = model.sample_loss(sample, again.point_cloud(again.segment_index(sample.key)), K + 1).total
            want = union.pipeline.model.sample_loss(expected, ds.point_cloud(ds.segment_index(expected.key)), K + 1).total
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-7), f"rank {r}'s sample"
    loss = float(resumed.train_step(K + 1)[0])
    assert math.isfinite(loss), "and it trains on from there"


def test_resume_as_rank_one_of_two_loads_its_segments_and_continues_its_stream(two_rank_run, tiny_dataset,
                                                                             monkeypatch):
    """Same world size: rank 1 of a resumed 2-rank run holds only its own segment's state (as
    trained, offsets included) and draws from its own saved stream. The process group is not
    needed to build and load a pipeline, so rank 1's view is made here by naming the world."""
    from evolsplat_ns.engine import distributed
    from evolsplat_ns.method_configs import evolsplat_lite_config

    _, run_dir = two_rank_run
    state = _checkpoint(run_dir)
    monkeypatch.setattr(distributed, "_CURRENT", distributed.Distributed(distributed.World(rank=1, size=2)))
    config = evolsplat_lite_config().pipeline
    config.datamanager.data = tiny_dataset
    config.datamanager.dataset.preload = False
    config.datamanager.prefetch = False
    config.model.max_gaussians_per_segment = 1500
    pipeline = config.setup(device="cpu", test_mode="val")
    dataset = pipeline.datamanager.dataset
    mine = {dataset.key(i) for i in dataset.train_segment_ids}
    assert len(mine) == 1 and all(dataset.segment_owner[k] == 1 for k in mine)
    pipeline.load_pipeline(state["pipeline"], state["step"])
    assert set(pipeline.model.segments.keys()) == mine, "rank 1 loads only its own segments"
    saved = state["pipeline"]["_model._extra_state"]["segments"]
    for key in mine:
        torch.testing.assert_close(pipeline.model.segments.get(key).node.offset, saved[str(key)]["node"]["offset"])
    streams = state["pipeline"]["datamanager._extra_state"]["streams"]
    assert pipeline.datamanager.get_extra_state() == streams[1], "rank 1 continues its own data stream"
    assert pipeline.datamanager.next_train(state["step"] + 1)[0].key in mine
    dataset.close()
