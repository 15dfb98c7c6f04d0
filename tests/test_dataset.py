"""Segments, keyframe selection, the train/eval split, the segment scheduler, the point-cloud cache
and the samples of ``MultiSceneDataset`` (shapes, segment-frame poses, downscaling, determinism)."""

from __future__ import annotations

import copy
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from evolsplat_ns.data import layout as L
from evolsplat_ns.data.cache import ImageCache, PointCloudCache, point_cloud_nbytes
from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig
from evolsplat_ns.data.scheduler import SegmentScheduler
from evolsplat_ns.data.segments import eval_frame_mask, nearest_sources, select_train_keyframes, split_segments
from evolsplat_ns.data.types import PointCloud
from evolsplat_ns.geometry import OPENCV2DATASET

from conftest import TINY_SYNTH

# ----------------------------------------------------------------------------- segments


@pytest.mark.parametrize("n, length, stride", [(10, 4, 2), (11, 4, 3), (12, 6, 3), (12, 5, 5), (7, 3, 1)])
def test_split_segments_windows(n, length, stride):
    frames = list(range(100, 100 + n))
    segs = split_segments(frames, length, stride)
    assert all(s == frames[frames.index(s[0]) : frames.index(s[0]) + length] for s in segs)  # consecutive runs
    starts = [frames.index(s[0]) for s in segs]
    assert starts[: len(range(0, n - length + 1, stride))] == list(range(0, n - length + 1, stride))
    assert segs[-1][-1] == frames[-1]  # the tail is aligned to the end: no frame left out
    assert sorted(set().union(*segs)) == frames
    if stride < length:  # consecutive windows overlap by length - stride (the last may overlap more)
        assert all(len(set(a) & set(b)) >= length - stride for a, b in zip(segs, segs[1:]))


def test_split_segments_edge_cases():
    assert split_segments(range(5), 8, 2) == [[0, 1, 2, 3, 4]]   # shorter than a segment
    assert split_segments(range(5), 0, 2) == [[0, 1, 2, 3, 4]]   # 0 = whole scene
    assert split_segments(range(11), 4, 3)[-1] == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="segment_stride must be > 0"):
        split_segments(range(10), 4, 0)


def test_eval_frame_mask():
    assert np.flatnonzero(eval_frame_mask(range(12), 4)).tolist() == [2, 6, 10]
    assert np.flatnonzero(eval_frame_mask(range(10), 3)).tolist() == [1, 4, 7]
    assert not eval_frame_mask(range(12), 0).any()
    with pytest.raises(ValueError, match="eval_frame_interval=1 holds out every frame"):
        eval_frame_mask(range(12), 1)


# ----------------------------------------------------------------------------- keyframe selection

KEYFRAMES = [0, 2, 4, 6, 8, 10, 12, 14]


@pytest.mark.parametrize("mode", ["between", "beside", "nearest"])
@pytest.mark.parametrize("num_source, num_target", [(2, 1), (3, 2), (4, 4)])
def test_selection_counts_and_disjoint(mode, num_source, num_target):
    rng = np.random.default_rng(0)
    for _ in range(30):
        src, tgt = select_train_keyframes(KEYFRAMES, num_source, num_target, mode, rng)
        assert len(src) == num_source and len(tgt) == num_target
        assert not set(src) & set(tgt)
        assert set(src) | set(tgt) <= set(KEYFRAMES)
        if mode == "between":
            assert all(min(src) < t < max(src) for t in tgt)
        if mode == "beside":  # one run of consecutive keyframes, sources on one side of the targets
            window = sorted(src + tgt)
            i = KEYFRAMES.index(window[0])
            assert window == KEYFRAMES[i : i + num_source + num_target]
            assert max(src) < min(tgt) or max(tgt) < min(src)


def test_between_window_moves():
    rng = np.random.default_rng(1)
    firsts = {select_train_keyframes(KEYFRAMES, 2, 1, "between", rng)[0][0] for _ in range(40)}
    assert len(firsts) == len(KEYFRAMES) - 2  # every window start is drawn


def test_nearest_picks_sources_nearest_by_pose():
    # Positions along a loop, so the nearest frames by pose are not the nearest by index.
    xy = {0: (0, 0), 1: (10, 0), 2: (20, 0), 3: (20, 10), 4: (10, 10), 5: (0.5, 10), 6: (0, 1)}
    poses = {t: np.block([[np.eye(3), np.array([x, y, 0.0])[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
             for t, (x, y) in xy.items()}
    assert nearest_sources([1, 2, 3, 4, 5, 6], [0], 2, poses) == [1, 6]
    assert nearest_sources([1, 2, 3, 4, 5, 6], [0], 2, None) == [1, 2]  # no poses: by frame index
    rng = np.random.default_rng(0)
    for _ in range(20):
        src, (tgt,) = select_train_keyframes(list(xy), 2, 1, "nearest", rng, poses)
        others = sorted((np.hypot(*np.subtract(xy[f], xy[tgt])), f) for f in xy if f != tgt)
        assert sorted(src) == sorted(f for _, f in others[:2])


def test_selection_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="segment has 3 keyframes but 3 source \\+ 1 target"):
        select_train_keyframes([0, 1, 2], 3, 1, "between", rng)
    with pytest.raises(ValueError, match="selection 'between' needs >= 2 source keyframes, got 1"):
        select_train_keyframes(KEYFRAMES, 1, 1, "between", rng)
    with pytest.raises(ValueError, match="unknown selection mode 'random'"):
        select_train_keyframes(KEYFRAMES, 2, 1, "random", rng)


# ----------------------------------------------------------------------------- scheduler


def _steps(s: SegmentScheduler, n: int) -> list[tuple[int, bool, int]]:
    return [(st.segment, st.is_new_segment, st.epoch) for st in (s.next() for _ in range(n))]


def test_scheduler_sequential():
    steps = _steps(SegmentScheduler(3, iters_per_segment=2, order="sequential"), 8)
    assert steps == [(0, True, 0), (0, False, 0), (1, True, 0), (1, False, 0), (2, True, 0), (2, False, 0),
                     (0, True, 1), (0, False, 1)]


def test_scheduler_shuffle_epochs_are_permutations():
    s = SegmentScheduler(5, iters_per_segment=3, order="shuffle", seed=4)
    steps = _steps(s, 5 * 3 * 4)
    for epoch in range(4):
        segs = [seg for seg, _, e in steps if e == epoch]
        assert len(segs) == 15 and sorted(set(segs)) == list(range(5))
        assert all(segs[i] == segs[i + 1] == segs[i + 2] for i in range(0, 15, 3))
    assert len({tuple(seg for seg, _, e in steps if e == k) for k in range(4)}) > 1  # reshuffled
    for (prev, _, _), (seg, new, _) in zip(steps, steps[1:]):
        assert new == (seg != prev)  # a visit to the same segment across epochs is no switch


def test_scheduler_is_deterministic_and_seeded():
    run = lambda seed: _steps(SegmentScheduler(6, 2, "shuffle", seed), 40)  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_scheduler_state_dict_resumes_identically():
    s = SegmentScheduler(4, iters_per_segment=3, order="shuffle", seed=9)
    _steps(s, 7)
    state = copy.deepcopy(s.state_dict())
    expected = _steps(s, 30)
    resumed = SegmentScheduler(4, iters_per_segment=3, order="shuffle", seed=123)
    resumed.load_state_dict(state)
    assert _steps(resumed, 30) == expected
    with pytest.raises(ValueError, match="checkpoint scheduler has 4 segments but the data now has 5"):
        SegmentScheduler(5).load_state_dict(state)


def test_scheduler_peek_and_errors():
    s = SegmentScheduler(3, 1, "sequential")
    s.next()
    assert s.peek_next_segment() == 1
    with pytest.raises(ValueError, match="no training segments"):
        SegmentScheduler(0)
    with pytest.raises(ValueError, match="iters_per_segment must be >= 1"):
        SegmentScheduler(3, 0)
    with pytest.raises(ValueError, match="order must be 'sequential' or 'shuffle'"):
        SegmentScheduler(3, 1, "random")


# ----------------------------------------------------------------------------- cache


def _cloud(n: int) -> PointCloud:
    return PointCloud(points=torch.zeros(n, 3), colors=torch.zeros(n, 3))


def test_cache_is_lru_bounded():
    built = []
    cache = PointCloudCache(lambda k: built.append(k) or _cloud(100), max_bytes=2 * 100 * 6 * 4, preload=False)
    assert point_cloud_nbytes(_cloud(100)) == 100 * 6 * 4
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # hit: "a" becomes most recent
    cache.get("c")              # evicts "b", the least recently used
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.nbytes <= cache.max_bytes
    cache.get("b")
    assert built == ["a", "b", "c", "b"] and cache.builds == 4 and cache.hits == 1


def test_cache_keeps_an_oversized_entry():
    cache = PointCloudCache(lambda k: _cloud(1000), max_bytes=10, preload=False)
    cache.get(1)
    cache.get(2)
    assert len(cache) == 1 and 2 in cache


def test_cache_preload_builds_in_background():
    release, started = threading.Event(), threading.Event()
    made = {}

    def build(key):
        started.set()
        assert release.wait(10), "build never released"
        made[key] = _cloud(10)
        return made[key]

    cache = PointCloudCache(build, preload=True)
    try:
        cache.preload("next")          # returns at once although the build blocks
        assert started.wait(10)
        assert "next" not in cache     # still building
        cache.preload("next")          # no second build for a pending key
        release.set()
        assert cache.get("next") is made["next"]
        assert cache.get("next") is made["next"]
        assert cache.builds == 1
    finally:
        release.set()
        cache.close()


def test_cache_preload_disabled_is_a_noop():
    cache = PointCloudCache(lambda k: _cloud(1), preload=False)
    cache.preload("x")
    assert cache.builds == 0 and len(cache) == 0


def test_image_cache_is_lru_bounded_by_bytes_and_read_only():
    loads = []

    def image(key):
        loads.append(key)
        return np.full((4, 5, 3), key, dtype=np.uint8)  # 60 bytes

    cache = ImageCache(max_bytes=130)
    for key in (1, 2, 1, 3):  # 3 evicts 2, the least recently used
        cache.get_or_load(key, lambda: image(key))
    assert loads == [1, 2, 3] and len(cache) == 2 and cache.nbytes == 120
    assert (cache.hits, cache.misses) == (1, 3)
    a = cache.get_or_load(1, lambda: image(99))
    assert int(a[0, 0, 0]) == 1 and not a.flags.writeable
    cache.get_or_load(2, lambda: image(2))
    assert loads == [1, 2, 3, 2], "2 was evicted: loaded again"
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(0)


def test_dataset_decodes_each_image_once_and_samples_are_unchanged(base_config, monkeypatch):
    """Samples drawn with the decoded-image cache equal those without; no image is decoded twice
    by the cached dataset; a negative bound names the setting."""
    plain = MultiSceneDataset(replace(base_config, image_cache_mb=0.0))
    cached = MultiSceneDataset(replace(base_config, image_cache_mb=64.0))
    assert plain.image_cache is None and cached.scenes[0].image_cache is cached.image_cache
    real_read = L.read_image
    reads = []
    monkeypatch.setattr(L, "read_image", lambda path, *a, **k: reads.append(str(path)) or real_read(path, *a, **k))
    expected = [plain.next_train_sample() for _ in range(6)]
    reads.clear()
    for a in expected:
        b = cached.next_train_sample()
        torch.testing.assert_close(b.source.images, a.source.images, rtol=0, atol=0)
        torch.testing.assert_close(b.target.images, a.target.images, rtol=0, atol=0)
    assert reads and len(set(reads)) == len(reads), "each image decoded once"
    assert cached.image_cache.hits > 0 and cached.image_cache.misses == len(reads)
    with pytest.raises(ValueError, match="image_cache_mb"):
        MultiSceneDataset(replace(base_config, image_cache_mb=-1.0))


# ----------------------------------------------------------------------------- MultiSceneDataset

HELD_OUT = [2, 6, 10]  # eval_frame_mask(range(12), 4)


@pytest.fixture(scope="module")
def base_config(tiny_dataset) -> MultiSceneDatasetConfig:
    return MultiSceneDatasetConfig(
        data=tiny_dataset, segment_length=6, segment_stride=3, num_source_keyframes=2, num_target_keyframes=1,
        num_eval_scenes=1, eval_frame_interval=4, iters_per_segment=2, selection="nearest", preload=False,
        load_sky_masks=True, load_depth=True, seed=0,
    )


@pytest.fixture(scope="module")
def dataset(base_config) -> MultiSceneDataset:
    ds = MultiSceneDataset(base_config)
    yield ds
    ds.close()


def _frames_of(sample) -> set[int]:
    return set(sample.source.frame_ids.tolist()) | set(sample.target.frame_ids.tolist())


def test_split_and_segments(dataset):
    assert [s.name for s in dataset.scenes] == ["000", "001", "002"]
    assert dataset.eval_scene_ids == {2}
    train_scenes = {dataset.segments[i].scene_index for i in dataset.train_segment_ids}
    assert train_scenes == {0, 1}
    assert dataset.num_train_segments == 2 * len(split_segments(range(12), 6, 3))
    eval_segments = [s for s in dataset.segments if s.scene_index == 2]
    assert all(not set(s.frames) & set(HELD_OUT) for s in eval_segments)  # so never in a point cloud
    assert sorted(t for _, t in dataset.eval_items) == HELD_OUT
    for seg_id, t in dataset.eval_items:  # attached to a segment spanning the held-out frame
        frames = dataset.segments[seg_id].frames
        assert dataset.segments[seg_id].scene_index == 2 and frames[0] < t < frames[-1]


def test_train_on_eval_scenes_never_uses_held_out_frames(base_config):
    ds = MultiSceneDataset(replace(base_config, train_on_eval_scenes=True, iters_per_segment=1,
                                   segment_order="sequential"))
    try:
        assert {ds.segments[i].scene_index for i in ds.train_segment_ids} == {0, 1, 2}
        for _ in range(2 * ds.num_train_segments):
            sample = ds.next_train_sample()
            if sample.key.scene == "002":
                assert not _frames_of(sample) & set(HELD_OUT)
                assert not set(sample.segment_frames) & set(HELD_OUT)
        eval_seg = next(i for i in ds.train_segment_ids if ds.segments[i].scene_index == 2)
        cloud_frames = ds.point_cloud(eval_seg).metadata["frames"]
        assert cloud_frames and not set(cloud_frames) & set(HELD_OUT)
    finally:
        ds.close()


def test_eval_samples_target_exactly_the_held_out_frames(dataset):
    n_cams = TINY_SYNTH["cameras"]
    targets = []
    for i in range(len(dataset.eval_items)):
        sample = dataset.eval_sample(i)
        t = dataset.eval_items[i][1]
        assert sample.key.scene == "002"
        assert sample.target.frame_ids.tolist() == [t] * n_cams
        assert len(sample.source) == dataset.config.num_source_keyframes * n_cams
        assert not set(sample.source.frame_ids.tolist()) & set(HELD_OUT)
        assert sample.lidar is not None and set(sample.lidar.frame_ids.tolist()) == {t}
        targets.append(t)
    assert targets == [t for _, t in dataset.eval_items]


def test_train_samples_shapes_and_flags(base_config):
    ds = MultiSceneDataset(replace(base_config, seed=5))
    n_cams, (W, H) = TINY_SYNTH["cameras"], (TINY_SYNTH["width"], TINY_SYNTH["height"])
    try:
        previous = None
        for _ in range(ds.num_train_segments * ds.config.iters_per_segment):
            s = ds.next_train_sample()
            assert s.key.scene in ("000", "001")
            assert s.is_new_segment == (s.key != previous)
            previous = s.key
            ns, nt = base_config.num_source_keyframes * n_cams, base_config.num_target_keyframes * n_cams
            src, tgt = s.source, s.target
            assert src.images.shape == (ns, H, W, 3) and tgt.images.shape == (nt, H, W, 3)
            assert src.images.dtype == torch.float32 and 0 <= src.images.min() and src.images.max() <= 1
            assert src.intrinsics.shape == (ns, 3, 3) and src.camtoworlds.shape == (ns, 4, 4)
            assert src.depths.shape == (ns, H, W) and src.sky_masks.shape == (ns, H, W)
            assert src.sky_masks.dtype == torch.bool
            assert src.cam_ids.tolist() == list(range(n_cams)) * base_config.num_source_keyframes  # frame-major
            assert not set(src.frame_ids.tolist()) & set(tgt.frame_ids.tolist())
            assert _frames_of(s) <= set(s.segment_frames)
            assert s.segment_to_world.shape == (4, 4)
        layout = next(sc.layout for sc in ds.scenes if sc.name == s.key.scene)
        for i, (t, cam) in enumerate(zip(src.frame_ids.tolist(), src.cam_ids.tolist())):  # the right files
            np.testing.assert_array_equal((src.images[i] * 255).round().byte().numpy(),
                                          L.read_image(layout.image_path(t, cam)))
        assert ds.scheduler.epoch == 0 and ds.scheduler.next().epoch == 1  # one epoch = every segment
    finally:
        ds.close()


def test_poses_are_in_the_segment_frame(dataset):
    for seg_id in (0, 4, 7):
        seg = dataset.segments[seg_id]
        scene = dataset.scenes[seg.scene_index]
        first, later = seg.frames[0], seg.frames[-1]
        s = dataset.load_sample(seg_id, [first], [later])
        ext = np.loadtxt(scene.layout.extrinsics_path(0)).reshape(4, 4)  # Waymo camera axes
        front = s.source.camtoworlds[s.source.cam_ids.tolist().index(0)].double().numpy()
        np.testing.assert_allclose(front, ext @ OPENCV2DATASET, atol=1e-5)
        np.testing.assert_allclose(s.segment_to_world.double().numpy(), scene.ego_to_world[first], rtol=1e-6)
        # A later frame: segment_to_world @ pose = that frame's camera-to-world.
        for i, cam in enumerate(s.target.cam_ids.tolist()):
            to_world = scene.ego_to_world[first] @ s.target.camtoworlds[i].double().numpy()
            np.testing.assert_allclose(to_world, scene.cam_to_world(later, cam), atol=2e-3)


def test_downscale_scales_intrinsics_and_images(base_config, dataset):
    half = MultiSceneDataset(replace(base_config, downscale=2.0))
    try:
        full_s, half_s = dataset.load_sample(0, [0], [1]), half.load_sample(0, [0], [1])
        assert half_s.source.images.shape[1:3] == (TINY_SYNTH["height"] // 2, TINY_SYNTH["width"] // 2)
        assert half_s.source.depths.shape[1:] == half_s.source.images.shape[1:3]
        K_full, K_half = full_s.source.intrinsics, half_s.source.intrinsics
        torch.testing.assert_close(K_half[:, :2, :], K_full[:, :2, :] / 2)
        torch.testing.assert_close(K_half[:, 2], K_full[:, 2])
        torch.testing.assert_close(half_s.source.camtoworlds, full_s.source.camtoworlds)
        # A box-filtered half image is the 2x2 mean of the full one (up to uint8 rounding).
        pooled = torch.nn.functional.avg_pool2d(full_s.source.images.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        assert (pooled - half_s.source.images).abs().max() < 1.5 / 255
    finally:
        half.close()


def _stream(ds: MultiSceneDataset, n: int) -> list:
    out = []
    for _ in range(n):
        s = ds.next_train_sample()
        out.append((str(s.key), s.source.frame_ids.tolist(), s.target.frame_ids.tolist(), s.is_new_segment,
                    s.target.images))
    return out


def _assert_same_stream(a: list, b: list) -> None:
    assert [x[:4] for x in a] == [x[:4] for x in b]
    assert all(torch.equal(x[4], y[4]) for x, y in zip(a, b))


def test_same_seed_same_samples(base_config):
    cfg = replace(base_config, seed=11, selection="between", load_depth=False)
    a, b = MultiSceneDataset(cfg), MultiSceneDataset(cfg)
    other = MultiSceneDataset(replace(cfg, seed=12))
    try:
        stream = _stream(a, 14)
        _assert_same_stream(stream, _stream(b, 14))
        assert [x[:3] for x in stream] != [x[:3] for x in _stream(other, 14)]
    finally:
        for ds in (a, b, other):
            ds.close()


def test_dataset_state_dict_resumes_identically(base_config):
    cfg = replace(base_config, seed=3, selection="beside", load_depth=False)
    a = MultiSceneDataset(cfg)
    b = MultiSceneDataset(replace(cfg, seed=99))
    try:
        _stream(a, 5)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        _assert_same_stream(_stream(a, 9), _stream(b, 9))
    finally:
        a.close()
        b.close()


def test_point_clouds_come_from_the_cache_and_preload(base_config):
    ds = MultiSceneDataset(replace(base_config, preload=True, segment_order="sequential", iters_per_segment=1,
                                   pointcloud=replace(base_config.pointcloud, voxel_size=0.2)))
    try:
        ds.next_train_sample()  # a new segment: the next one's point cloud starts building
        nxt = ds.train_segment_ids[1]
        pc = ds.point_cloud(nxt)
        assert ds.cache.builds == 1 and ds.point_cloud(nxt) is pc
        assert pc.metadata["frames"] == ds.segments[nxt].frames and len(pc) > 0
    finally:
        ds.close()


def test_single_scene_trains_on_its_context_frames(base_config, tiny_dataset):
    ds = MultiSceneDataset(replace(base_config, data=tiny_dataset / "001"))
    try:
        assert ds.eval_scene_ids == {0} and ds.num_train_segments == len(ds.segments) == 2
        assert sorted(t for _, t in ds.eval_items) == HELD_OUT
        for _ in range(4):
            assert not _frames_of(ds.next_train_sample()) & set(HELD_OUT)
    finally:
        ds.close()


def test_bad_dataset_settings(base_config):
    with pytest.raises(ValueError, match=r"eval_scenes \['nope'\] not found .* scenes: \['000', '001', '002'\]"):
        MultiSceneDataset(replace(base_config, eval_scenes=("nope",)))
    with pytest.raises(ValueError, match="no training segments"):
        MultiSceneDataset(replace(base_config, num_eval_scenes=3))


def test_too_short_segments_fail_at_start_up(tiny_dataset):
    from evolsplat_ns.data.dataset import MultiSceneDataset, MultiSceneDatasetConfig

    cfg = MultiSceneDatasetConfig(data=tiny_dataset, segment_length=4, segment_stride=4,
                                  num_source_keyframes=3, num_target_keyframes=2, preload=False)
    with pytest.raises(ValueError, match=r"fewer keyframes than num_source_keyframes \+ num_target_keyframes = 5"):
        MultiSceneDataset(cfg)


def test_uint8_samples_hold_the_decoded_bytes_and_move_as_the_float_ones(base_config):
    """A training sample drawn with ``uint8_rgb`` (the datamanager's, pinned on a GPU host) holds
    the decoded bytes; moved (Views.to) its images are bit-identical to the float sample's."""
    plain, packed = MultiSceneDataset(replace(base_config, seed=3)), MultiSceneDataset(replace(base_config, seed=3))
    try:
        for _ in range(3):
            f, u = plain.next_train_sample(), packed.next_train_sample(uint8_rgb=True)
            assert f.key == u.key
            for fv, uv in ((f.source, u.source), (f.target, u.target)):
                assert uv.images.dtype == torch.uint8 and fv.images.dtype == torch.float32
                assert torch.equal((fv.images * 255).round().byte(), uv.images)
                moved = uv.to("cpu")
                assert moved.images.dtype == torch.float32 and torch.equal(moved.images, fv.images)
                assert torch.equal(moved.camtoworlds, fv.camtoworlds) and torch.equal(moved.depths, fv.depths)
                assert uv.images.dtype == torch.uint8, "moving leaves the sample itself as it was"
    finally:
        plain.close()
        packed.close()
