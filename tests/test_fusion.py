"""``utils/fusion.py`` and the one draw compiled (``layers.PREPARE`` / ``FINISH``), on the CPU.

Inductor's kernels need a GPU (``tests/gpu/test_fusion_gpu.py``); here the functions are traced by
dynamo and AOTAutograd with a backend that runs the traced graph eagerly, which shows what breaks
a compile (graph breaks under ``fullgraph``, shapes that do not stay symbolic) and that the traced
forward and backward are the eager ones. Scene: ``tests/test_layered_render.py``'s."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from evolsplat_ns.model.render import layers
from evolsplat_ns.model.render.layers import rasterize_layered, rasterize_layered_blocks
from evolsplat_ns.utils.fusion import DISABLE_ENV, Fusable, fusion_available

from test_layered_render import C2W, H, K, OUTPUTS, W, _gaussians, _scene


class CountingBackend:
    """AOTAutograd + eager graphs (``aot_eager``), counting the compiles."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_one_compile_serves_every_row_count():
    backend = CountingBackend()
    fused = Fusable(lambda x, w, *, power: (torch.sigmoid(x) * w).pow(power).sum(-1))
    compiles = []
    for n in (7, 19, 300, 41):
        x, w = torch.randn(n, 3, requires_grad=True), torch.randn(3)
        out = fused(x, w, backend=backend, power=2)
        torch.testing.assert_close(out, (torch.sigmoid(x) * w).pow(2).sum(-1))
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.autograd.functional.vjp(
            lambda t: (torch.sigmoid(t) * w).pow(2).sum(-1), x.detach(), torch.ones(n))[1])
        compiles.append(backend.compiles)
    assert compiles == [1, 2, 2, 2]  # its shapes, then the row count symbolic: reused from then on
    fused(torch.randn(5, 3), torch.randn(3), backend=backend, power=3)  # a new static value: its own version
    assert backend.compiles == 3


def test_a_function_that_cannot_compile_warns_once_and_runs_eagerly():
    def host_branch(x):
        return x * 2 if float(x.sum()) > 0 else x * 3  # a host read: a graph break under fullgraph

    fused, x = Fusable(host_branch), torch.ones(4)
    with pytest.warns(UserWarning, match=f"host_branch.*{DISABLE_ENV}"):
        torch.testing.assert_close(fused(x, backend="aot_eager"), x * 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fused(-x, backend="aot_eager"), -x * 3)


def test_errors_of_the_function_itself_still_raise():
    fused = Fusable(lambda a, b: a + b)
    with pytest.raises(RuntimeError):
        fused(torch.ones(3), torch.ones(4), backend=None)


def _draw_and_grads(backend, front_rows: int, sky: bool):
    front, back = _gaussians(front_rows, (2.0, 8.0), 6.0, 0.4, (0.2, 0.7), seed=front_rows), _scene()[1]
    leaves = [front.means, front.sh, front.opacities, back.sh, back.scales]
    for t in leaves:
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    warp = (torch.rand(H, W, 3, generator=g), torch.rand(H, W, generator=g)) if sky else None
    image = rasterize_layered(front, back, C2W, K, W, H, sh_degree=1, sky=warp, backend="reference",
                              compile_backend=backend)
    loss = sum((getattr(image, name) * (i + 1)).square().mean() for i, name in enumerate(OUTPUTS))
    return image, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("sky", [False, True])
def test_compiled_one_draw_equals_eager_with_gradients(sky: bool):
    backend, compiles = CountingBackend(), []
    for rows in (40, 57, 71):
        eager, eager_grads = _draw_and_grads(None, rows, sky)
        traced, traced_grads = _draw_and_grads(backend, rows, sky)
        for name in OUTPUTS:
            torch.testing.assert_close(getattr(traced, name), getattr(eager, name), atol=1e-5, rtol=1e-5)
        for a, b in zip(traced_grads, eager_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        compiles.append(backend.compiles)
    # prepare and finish; prepare once more with its row count symbolic; nothing for the third count
    assert compiles[1] == compiles[2] <= 3


def test_compiled_draw_of_parts_equals_eager():
    front, back = _scene()
    actors = _gaussians(9, (3.0, 6.0), 2.0, 0.3, (0.4, 0.8), seed=5)
    images = [rasterize_layered([front, actors], back, C2W, K, W, H, sh_degree=1, backend="reference",
                                compile_backend=b) for b in (None, CountingBackend())]
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(images[1], name), getattr(images[0], name), atol=1e-5, rtol=1e-5)


def test_compiled_blocks_draw_equals_eager():
    fronts = [_gaussians(n, (2.0, 8.0), 6.0, 0.4, (0.2, 0.7), seed=n) for n in (30, 45)]
    back = _scene()[1]
    c2ws = torch.stack([C2W, C2W.clone()])
    c2ws[1, 0, 3] = 0.5
    Ks = torch.stack([K, K])
    images = [rasterize_layered_blocks(fronts, back, c2ws, Ks, W, H, sh_degree=1, backend="reference",
                                       compile_backend=b) for b in (None, CountingBackend())]
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(images[1], name), getattr(images[0], name), atol=1e-5, rtol=1e-5)


def test_fusion_only_where_inductor_fuses(monkeypatch):
    assert not fusion_available(torch.device("cpu"))
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert not fusion_available(torch.device("cuda"))
