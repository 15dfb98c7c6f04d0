"""Captured renders (``utils/cuda_graphs.py``, ``EVolSplatModel.render(reuse_graphs=True)``): the
cache's policy on the CPU (a stand-in capture), and that CPU renders stay eager. The CUDA
capture itself is checked in ``tests/gpu/test_cuda_graphs_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.data.types import PointCloud, SegmentKey, Views
from evolsplat_ns.utils import cuda_graphs
from evolsplat_ns.utils.cuda_graphs import GraphCache

W, H = 32, 24


def render_setup(device: str = "cpu", **config):
    """A tiny model (sources background; ``config`` overrides its settings) in a context of 3
    OpenCV cameras at (x, 0, 0) looking along segment +z at 400 points 4-7 m ahead; returns
    (model, encoded state, target K)."""
    from evolsplat_ns.model.evolsplat_model import EVolSplatModel, EVolSplatModelConfig

    torch.manual_seed(0)
    settings = dict(sh_degree=1, background_points=128, num_neighbour_select=2, cuda_graph_render=True)
    model = EVolSplatModel(EVolSplatModelConfig(**{**settings, **config}),
                           scene_box=None, num_train_data=1).to(device).eval()
    g = torch.Generator().manual_seed(0)
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, 0, 3] = torch.tensor([-0.5, 0.0, 0.5])
    K = torch.tensor([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1.0]])
    sources = Views(torch.rand(3, H, W, 3, generator=g), K.repeat(3, 1, 1), c2w, torch.arange(3),
                    torch.zeros(3, dtype=torch.long))
    pts = torch.rand(400, 3, generator=g) * torch.tensor([4.0, 3.0, 3.0]) + torch.tensor([-2.0, -1.5, 4.0])
    model.set_context(SegmentKey.parse("000/seg000"), sources, PointCloud(pts, torch.rand(400, 3, generator=g)))
    with torch.no_grad():
        state = model.encode(split_backward=False)
    return model, state, K


def target_pose(x: float) -> torch.Tensor:
    c2w = torch.eye(4)
    c2w[0, 3] = x
    return c2w


class _FakeCapture:
    """Stands in for a CUDA capture: runs ``fn`` on each call, counts captures."""

    made = 0

    def __init__(self, fn, inputs, device) -> None:
        type(self).made += 1
        self.fn = fn

    def __call__(self, *inputs):
        return self.fn(*inputs)


def test_cache_captures_on_the_second_call_keeps_capacity_and_replays(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "CapturedCall", _FakeCapture)
    _FakeCapture.made = 0
    cache = GraphCache(capacity=2, capture_after=2)
    double = lambda x: 2 * x  # noqa: E731
    x = torch.ones(3)
    assert torch.equal(cache("a", double, (x,), torch.device("cpu")), 2 * x)
    assert len(cache) == 0 and _FakeCapture.made == 0  # a one-off call stays eager
    cache("a", double, (x,), torch.device("cpu"))
    assert len(cache) == 1 and _FakeCapture.made == 1
    cache("a", double, (x,), torch.device("cpu"))
    assert cache.replays == 1 and _FakeCapture.made == 1
    for key in ("b", "b", "c", "c"):
        cache(key, double, (x,), torch.device("cpu"))
    assert len(cache) == 2 and _FakeCapture.made == 3  # "a", least recently used, was dropped


def test_a_failed_capture_warns_once_and_renders_eagerly(monkeypatch):
    def refuse(fn, inputs, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "CapturedCall", refuse)
    cache = GraphCache(capture_after=1)
    with pytest.warns(UserWarning, match="capture failed"):
        out = cache("a", lambda x: x + 1, (torch.zeros(2),), torch.device("cpu"))
    assert torch.equal(out, torch.ones(2)) and cache.disabled
    assert torch.equal(cache("b", lambda x: x + 2, (torch.zeros(2),), torch.device("cpu")), torch.full((2,), 2.0))


def test_cache_rejects_bad_settings():
    with pytest.raises(ValueError, match="capacity"):
        GraphCache(capacity=0)


def test_cpu_renders_stay_eager_and_equal():
    model, state, K = render_setup("cpu")
    with torch.no_grad():
        eager = model.render(state, target_pose(0.2), K, W, H)
        for _ in range(3):
            reused = model.render(state, target_pose(0.2), K, W, H, reuse_graphs=True)
    assert len(state.graphs) == 0
    torch.testing.assert_close(reused["rgb"], eager["rgb"])


def test_padded_heads_give_the_unpadded_gaussians_and_gradients(monkeypatch):
    """The training graph's route for the heads (rows padded to a bucket, outputs cut back) run
    eagerly on the CPU: the same Gaussians and the same gradients as the unpadded heads."""
    from evolsplat_ns.model import predictor as predictor_module
    from evolsplat_ns.model.heads import bucket_rows

    model, _, K = render_setup()
    params = list(model.predictor._decoder[0].parameters())

    def gradients(padded: bool):
        monkeypatch.setattr(predictor_module, "_can_graph_heads", lambda *a: padded)
        model.zero_grad(set_to_none=True)
        state = model.encode(split_backward=True)
        g = model.predictor.predict(state, target_pose(0.1), K, graphed=True)
        (g.sh.square().sum() + g.scales.sum() + g.quats[:, 1:].sum() + g.opacities.sum() + g.means.sum()).backward()
        return g, [p.grad.clone() for p in params] + [state.volume_feat.grad.clone(), state.offset.grad.clone()]

    eager, eager_grads = gradients(False)
    padded, padded_grads = gradients(True)
    m = len(eager.index)
    assert bucket_rows(m) > m, "the scene must need padding for this test to mean anything"
    for name in ("means", "sh", "scales", "quats", "opacities", "index", "offset"):
        torch.testing.assert_close(getattr(padded, name), getattr(eager, name), rtol=1e-6, atol=1e-7)
    for a, b in zip(padded_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows,expected", [(1, 1), (4, 4), (9, 10), (100, 112), (65536, 65536), (65537, 81920),
                                           (100_000, 114_688)])
def test_bucket_rows_pads_by_at_most_a_quarter(rows, expected):
    from evolsplat_ns.model.heads import bucket_rows

    assert bucket_rows(rows) == expected and expected - rows <= rows / 4


def test_heads_graph_route_picks_the_cache_by_grad(monkeypatch):
    """Training predictions go to the forward + backward graphs, no-grad renders to the forward
    graphs, both keyed by padded row count (a stand-in capture on the CPU)."""
    from evolsplat_ns.model import predictor as predictor_module

    monkeypatch.setattr(cuda_graphs, "CapturedCall", _FakeCapture)
    monkeypatch.setattr(cuda_graphs, "CapturedGradCall", _FakeCapture)
    monkeypatch.setattr(predictor_module, "_can_graph_heads", lambda *a: True)
    model, _, K = render_setup()
    heads = model.predictor
    heads._head_graphs, heads._head_render_graphs = GraphCache(grad=True), GraphCache()
    state = model.encode(split_backward=True)
    for _ in range(3):
        g = heads.predict(state, target_pose(0.1), K, graphed=True)
        g.sh.sum().backward(retain_graph=True)
    with torch.no_grad():
        for _ in range(3):
            heads.predict(state, target_pose(0.1), K, graphed=True)
    (train_key,), (render_key,) = heads._head_graphs._graphs, heads._head_render_graphs._graphs
    assert train_key[1] is True and render_key[1] == tuple(state.volume_feat.shape) and train_key[0] == render_key[0]
    assert heads._head_graphs.replays == 1 and heads._head_render_graphs.replays == 1


def test_graphed_render_rows_equal_the_eager_prediction(monkeypatch):
    """The no-grad route gathers the rows inside the graphed call (from the state's whole offset
    and volume tensors) and cuts the padding off: the same Gaussians as the eager route."""
    from evolsplat_ns.model import predictor as predictor_module

    monkeypatch.setattr(cuda_graphs, "CapturedCall", _FakeCapture)
    monkeypatch.setattr(predictor_module, "_can_graph_heads", lambda *a: True)
    model, state, K = render_setup()
    heads = model.predictor
    heads._head_render_graphs = GraphCache()
    with torch.no_grad():
        eager = heads.predict(state, target_pose(0.2), K)
        for _ in range(3):
            graphed = heads.predict(state, target_pose(0.2), K, graphed=True)
    assert heads._head_render_graphs.replays == 1
    for name in ("means", "offset", "sh", "scales", "quats", "opacities", "index"):
        a, b = getattr(eager, name), getattr(graphed, name)
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), name


def test_input_memo_copies_only_new_or_modified_tensors():
    from evolsplat_ns.utils.cuda_graphs import InputMemo

    a, b = torch.zeros(3), torch.ones(2)
    memo = InputMemo(2)
    assert memo.changed(0, a) and memo.changed(1, b)  # first sight
    assert not memo.changed(0, a) and not memo.changed(1, b)  # same objects, unmodified
    with torch.no_grad():
        a.add_(1)  # an in-place write bumps the version, under no_grad too
    assert memo.changed(0, a) and not memo.changed(0, a)
    assert memo.changed(1, b.clone())  # an equal but other tensor
    assert memo.changed(1, (a, b)) and memo.changed(1, (a, b))  # nested: always copied
    del a
    assert memo.changed(0, torch.zeros(3))  # the freed tensor's weak reference is dead
    with torch.inference_mode():
        t = torch.zeros(2)
    assert memo.changed(1, t) and memo.changed(1, t)  # no version counter: always copied


def test_gaussian_params_head_cuts_every_field():
    from evolsplat_ns.model.node import GaussianParams

    g = GaussianParams(torch.rand(5, 3), torch.rand(5, 4), torch.rand(5, 3), torch.rand(5), torch.rand(5, 4, 3),
                       index=torch.arange(5), offset=torch.rand(5, 3))
    h = g.head(3)
    assert len(h) == 3 and h.index.tolist() == [0, 1, 2] and h.sh.shape == (3, 4, 3)
    assert h.means.data_ptr() == g.means.data_ptr()  # views, not copies
    assert GaussianParams(g.means, g.quats, g.scales, g.opacities, g.sh).head(2).offset is None


def test_training_captures_ask_for_thread_local_mode_and_restore_torch():
    """make_graphed_callables takes no capture mode on this torch: while a training graph is
    captured, torch.cuda.graph presets thread_local (else another thread's CUDA call, the
    prefetcher's pin_memory, breaks the capture), and torch's own graph is back afterwards."""
    import inspect

    from evolsplat_ns.utils import cuda_graphs

    original = torch.cuda.graph
    with cuda_graphs._graphed_callables_capture_mode() as kwargs:
        if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
            assert kwargs == {"capture_error_mode": "thread_local"}
        else:
            assert kwargs == {} and torch.cuda.graph.keywords == {"capture_error_mode": "thread_local"}
            assert torch.cuda.graph.func is original
    assert torch.cuda.graph is original


def test_training_captures_hold_the_capture_lock():
    """One capture at a time in the process: a training capture (here its mode context) holds the
    lock that every capture takes, so another thread's capture waits for it."""
    import threading

    from evolsplat_ns.utils import cuda_graphs

    inside, release, other_got_it = threading.Event(), threading.Event(), []

    def capture() -> None:
        with cuda_graphs._graphed_callables_capture_mode():
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=capture)
    worker.start()
    assert inside.wait(5)
    other_got_it.append(cuda_graphs.CAPTURE_LOCK.acquire(blocking=False))
    release.set()
    worker.join(5)
    assert other_got_it == [False], "another thread took the capture lock during a capture"
    assert cuda_graphs.CAPTURE_LOCK.acquire(blocking=False)
    cuda_graphs.CAPTURE_LOCK.release()
