"""Captured renders on CUDA: a replay equals the eager render at every pose, needs no host sync
between replays' inputs and outputs, and one graph serves a moving camera."""

from __future__ import annotations

import pytest
import torch

from test_cuda_graphs import H, W, render_setup, target_pose

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@torch.no_grad()
def test_replay_matches_eager_at_moving_poses():
    model, state, K = render_setup("cuda")
    for x in (0.20, 0.22, 0.24, 0.26):  # near enough to keep the same nearest sources: one graph
        eager = model.render(state, target_pose(x), K, W, H)
        e_params = {k: getattr(eager["gaussians"], k).clone() for k in ("means", "scales", "opacities", "sh")}
        graphed = model.render(state, target_pose(x), K, W, H, reuse_graphs=True)
        for k, v in e_params.items():
            torch.testing.assert_close(getattr(graphed["gaussians"], k), v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graphed["rgb"], eager["rgb"], rtol=1e-4, atol=1e-5)
    assert len(state.graphs) == 1 and state.graphs.replays >= 1 and state.graphs.disabled is None


@torch.no_grad()
def test_decode_replay_needs_no_sync():
    model, state, K = render_setup("cuda")
    views = model.predictor.nearest_views(state, target_pose(0.1))
    c2w, Kd = target_pose(0.1).cuda(), K.cuda()
    for _ in range(2):  # the second call captures
        model._decode(state, views, c2w, Kd, W, H, reuse_graphs=True)
    moved = target_pose(0.3).cuda()  # the host-to-device copy of the pose is the caller's, before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        params, sky = model._decode(state, views, moved, Kd, W, H, reuse_graphs=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.graphs.replays == 1 and sky is not None
    ref, ref_sky = model._decode(state, views, target_pose(0.3).cuda(), Kd, W, H, reuse_graphs=False)
    torch.testing.assert_close(params.scales, ref.scales, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sky[0], ref_sky[0], rtol=1e-5, atol=1e-6)


def test_graphed_loss_gives_the_eager_gradients_target_after_target():
    model, state, K = render_setup("cuda")
    g = torch.Generator().manual_seed(1)
    gts = [torch.rand(H, W, 3, generator=g).cuda() for _ in range(3)]
    preds = [torch.rand(H, W, 3, generator=g).cuda() for _ in range(3)]
    for pred, gt in zip(preds, gts):  # the second call captures, the third replays
        eager_in = pred.clone().requires_grad_(True)
        eager = model.view_loss({"rgb": eager_in, "accumulation": torch.ones(H, W, 1, device="cuda")}, gt, step=1)
        eager["rgb_loss"].backward()
        graphed_in = pred.clone().requires_grad_(True)
        graphed = model.view_loss({"rgb": graphed_in, "accumulation": torch.ones(H, W, 1, device="cuda")}, gt,
                                  step=1, graphed=True)
        graphed["rgb_loss"].backward()  # before the next target's forward, as the per-target loop does
        torch.testing.assert_close(graphed["rgb_loss"].detach(), eager["rgb_loss"].detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(graphed_in.grad, eager_in.grad, rtol=1e-4, atol=1e-8)
    assert len(model._loss_graphs) == 1 and model._loss_graphs.replays == 1



def test_training_renders_replay_the_sky_warp_and_keep_gradients():
    model, _, K = render_setup("cuda")
    state = model.encode(split_backward=True)  # with grad, as a training step
    grads = []
    for reuse in (False, True, True, True):
        out = model.render(state, target_pose(0.25), K, W, H, reuse_graphs=reuse)
        out["rgb"].square().mean().backward(inputs=[state.volume_feat])
        grads.append(state.volume_feat.grad.clone())
        state.volume_feat.grad = None
    assert len(model.predictor._warp_graphs) == 1 and model.predictor._warp_graphs.replays >= 1
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_graphed_heads_accumulate_the_eager_gradients_target_after_target(dtype):
    """Three targets per step with per-target backward: the first graphed step captures (its first
    target runs eagerly), the second replays for every target, starting with no .grad (the case
    where autograd would adopt the graph's static gradient buffer). bf16: under the trainer's
    autocast (no weight-cast cache), each target in its own region."""
    model, _, K = render_setup("cuda")
    model.train()
    params = list(model.predictor._decoder[0].parameters())

    def region():
        return torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)

    def step(reuse: bool):
        model.zero_grad(set_to_none=True)
        with region():
            state = model.encode(split_backward=True)
        for x in (0.20, 0.22, 0.24):  # the same nearest sources: one row count, one graph
            with region():
                out = model.render(state, target_pose(x), K, W, H, reuse_graphs=reuse)
            out["rgb"].float().square().mean().backward()
        return [p.grad.clone() for p in params] + [state.volume_feat.grad.clone(), state.offset.grad.clone()]

    eager = step(False)
    for _ in range(2):
        graphed = step(True)
        for a, b in zip(graphed, eager):
            if dtype is None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
            else:
                # Padded rows change the bf16 GEMMs' tiling, hence their rounding, which the
                # rasteriser's backward amplifies: cosine 0.992 measured on an H200 (fallback run).
                # A graph that kept only the last target's gradient would be a third of the norm.
                a, b = a.float().flatten(), b.float().flatten()
                assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
                assert abs(a.norm() / b.norm() - 1) < 0.05
    heads = model.predictor._head_graphs
    if dtype is not None and heads.disabled is not None:
        # On the H200 this tiny scene's bf16 capture is refused (cudaErrorStreamCaptureInvalidated;
        # the 100k benchmark's bf16 heads capture): the cache then runs eagerly, as checked above.
        assert len(heads) == 0
        return
    assert len(heads) == 1 and heads.replays >= 4 and heads.disabled is None


@torch.no_grad()
def test_render_heads_replay_one_graph_per_row_count():
    """Without the whole-decode graph, no-grad renders replay the heads' forward graph of their
    padded row count (shared by every state and source set of that size)."""
    model, state, K = render_setup("cuda")
    model.config.cuda_graph_render = False
    for x in (0.20, 0.22, 0.24, 0.26):
        eager = model.render(state, target_pose(x), K, W, H)
        expected = {k: getattr(eager["gaussians"], k).clone() for k in ("means", "scales", "quats", "opacities", "sh")}
        graphed = model.render(state, target_pose(x), K, W, H, reuse_graphs=True)
        for k, v in expected.items():
            torch.testing.assert_close(getattr(graphed["gaussians"], k), v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graphed["rgb"], eager["rgb"], rtol=1e-4, atol=1e-5)
    heads = model.predictor._head_render_graphs
    assert len(heads) == 1 and heads.replays >= 2 and heads.disabled is None and len(state.graphs) == 0


@torch.no_grad()
def test_replay_copies_only_changed_inputs_and_follows_them():
    from evolsplat_ns.utils.cuda_graphs import CapturedCall

    x, y = torch.rand(1000, device="cuda"), torch.rand(1000, device="cuda")
    call = CapturedCall(lambda a, b: a * 2 + b, (x, y), torch.device("cuda"))
    torch.testing.assert_close(call(x, y), x * 2 + y)
    x.mul_(3)  # in place: copied again
    torch.testing.assert_close(call(x, y), x * 2 + y)
    z = torch.rand(1000, device="cuda")  # another tensor: copied
    torch.testing.assert_close(call(x, z), x * 2 + z)


@torch.no_grad()
def test_render_replay_follows_an_in_place_change_of_the_state():
    """The render heads' graph reads the state's whole offset tensor; writing it in place between
    two frames reaches the next replay (its memo sees the new version)."""
    model, state, K = render_setup("cuda")
    model.config.cuda_graph_render = False
    pose = target_pose(0.2)
    for _ in range(3):
        model.render(state, pose, K, W, H, reuse_graphs=True)
    state.offset.add_(0.01)
    expected = model.render(state, pose, K, W, H)["gaussians"].means.clone()
    torch.testing.assert_close(model.render(state, pose, K, W, H, reuse_graphs=True)["gaussians"].means, expected)
    assert model.predictor._head_render_graphs.replays >= 2


def test_batched_targets_give_the_per_target_gradients():
    """``batch_targets`` on the GPU (gsplat blocks draw, the targets' losses in one graph, captured
    at the second step and replayed at the third) against per-target backward with its graphs."""
    from contextlib import nullcontext

    from evolsplat_ns.data.types import Views

    model, _, K = render_setup("cuda")
    g = torch.Generator().manual_seed(2)
    poses = torch.stack([target_pose(x) for x in (0.2, 0.25, 0.3)])
    targets = Views(torch.rand(3, H, W, 3, generator=g).cuda(), K.repeat(3, 1, 1), poses, torch.arange(3),
                    torch.zeros(3, dtype=torch.long))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(losses_of):
        model.zero_grad(set_to_none=True)
        state = model.encode(split_backward=True)
        losses = losses_of(state)
        state.backward_shared()
        return losses, [p.grad.clone() if p.grad is not None else None for p in params]

    def per_target(state):  # each target back-propagated before the next (its graphs' contract)
        losses = []
        for v in range(3):
            result = model.target_loss(state, targets, v, 1, graphed=True)
            sum(result.losses.values()).backward()
            losses.append(result.losses["rgb_loss"].detach())
        return losses

    def batched(state):
        results = model._batched_losses(state, targets, 1, lambda loss: loss.backward(), nullcontext)
        return [r.losses["rgb_loss"] for r in results]

    want_losses, want = grads(per_target)
    for _ in range(3):
        got_losses, got = grads(batched)
        torch.testing.assert_close(torch.stack(got_losses), torch.stack(want_losses), rtol=1e-5, atol=1e-7)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert any(key[0] == "targets" for key in model._loss_graphs._graphs) and model._loss_graphs.replays >= 1


@torch.no_grad()
def test_chained_replays_pass_new_values_on():
    """A graph reading another graph's outputs sees each replay's values (outputs' versions bump)."""
    from evolsplat_ns.utils.cuda_graphs import CapturedCall

    x, y = torch.rand(64, device="cuda"), torch.rand(64, device="cuda")
    first = CapturedCall(lambda a, b: a * 2 + b, (x, y), torch.device("cuda"))
    second = CapturedCall(lambda a: a + 1, (first(x, y),), torch.device("cuda"))
    for scale in (1.0, 3.0):
        x.mul_(scale)
        torch.testing.assert_close(second(first(x, y)), x * 2 + y + 1)


def test_captures_survive_another_thread_pinning_memory():
    """A capture in CUDA's default global mode fails when another thread pins host memory (the
    training prefetcher pins every next sample); captures here run in thread_local mode."""
    import threading

    from evolsplat_ns.utils.cuda_graphs import GraphCache

    stop, errors = threading.Event(), []

    def pin_forever() -> None:
        n = 0
        while not stop.is_set():
            try:
                torch.empty(1024 << (n % 12)).pin_memory()  # new sizes: fresh cudaHostAlloc calls
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(err)
                return
            n += 1

    head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    caches = (GraphCache(capacity=2, capture_after=1), GraphCache(capacity=2, capture_after=1, grad=True))
    pinner = threading.Thread(target=pin_forever, daemon=True)
    pinner.start()
    try:
        for key in range(12):  # a new key captures at its first call
            x = torch.randn(100 + key, 32, device="cuda")
            with torch.no_grad():
                out = caches[0](key, head, (x,), x.device)
                torch.testing.assert_close(out, head(x), rtol=1e-5, atol=1e-6)
            graded = caches[1](key, head, (x,), x.device)
            graded.sum().backward()
    finally:
        stop.set()
        pinner.join()
    assert errors == [] and all(c.disabled is None for c in caches), (errors, [c.disabled for c in caches])
