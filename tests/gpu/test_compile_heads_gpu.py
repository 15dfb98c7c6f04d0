"""``compile_heads``: the compiled per-target decode equals the eager one, forward and backward
(needs CUDA: on CPU the inductor compile alone takes about a minute on two cores)."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model.predictor import GaussianPredictor, PredictorConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compile time on CPU)"),
]


def _rows(m: int, predictor: GaussianPredictor) -> list[torch.Tensor]:
    """Decode inputs for ``m`` Gaussians 5-25 m in front of an identity OpenCV camera."""
    g = torch.Generator().manual_seed(m)
    a = 2 * (3 * predictor.projector.window_size + 1)
    c = predictor.config.sparseConv_outdim
    means = torch.rand(m, 3, generator=g) * torch.tensor([10.0, 4.0, 20.0]) + torch.tensor([-5.0, -2.0, 5.0])
    K = torch.tensor([[500.0, 0.0, 480.0], [0.0, 500.0, 320.0], [0.0, 0.0, 1.0]])
    rows = [torch.rand(m, a, generator=g), torch.randn(m, c, generator=g), means, torch.eye(4), K,
            torch.rand(m, 3, generator=g), torch.randn(m, 3, generator=g) - 3.0]
    return [t.cuda().requires_grad_(i in (0, 1, 2)) for i, t in enumerate(rows)]


def test_compiled_decode_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    predictor = GaussianPredictor(PredictorConfig(compile_heads=True)).cuda()
    for m in (3000, 4100):  # two row counts: one dynamic-shape compile serves both
        rows = _rows(m, predictor)
        compiled = predictor._decoder()(*rows)
        grads_c = torch.autograd.grad(sum(o.float().square().sum() for o in compiled), rows[:3])
        eager = predictor.decode(*rows)
        grads_e = torch.autograd.grad(sum(o.float().square().sum() for o in eager), rows[:3])
        for c, e in zip(compiled + grads_c, eager + grads_e):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
