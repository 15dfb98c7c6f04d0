"""Foreground + sky dome rasterised in one call vs two (``model/render/layers.py``), GPU (gsplat).

Random foreground (``--gaussians``, 3-60 m ahead) and a 2048-Gaussian dome 150 m out at 960x640;
times forward + backward of :func:`rasterize_layered` (ms, CUDA-synchronised per iteration) and
counts CUDA kernels per iteration (torch profiler).

    python benchmarks/layered_draw.py --gaussians 100000 --iters 50
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from evolsplat_ns.model.background import dome_directions
from evolsplat_ns.model.node import GaussianParams
from evolsplat_ns.model.render.layers import rasterize_layered

W, H = 960, 640


def _scene(n: int) -> tuple[GaussianParams, GaussianParams]:
    g = torch.Generator().manual_seed(0)
    means = torch.rand(n, 3, generator=g) * torch.tensor([60.0, 20.0, 57.0]) + torch.tensor([-30.0, -10.0, 3.0])
    front = GaussianParams(means, torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.2 + 0.02,
                           torch.rand(n, generator=g) * 0.9 + 0.05, torch.randn(n, 4, 3, generator=g) * 0.3)
    dirs = dome_directions(2048, -10.0, torch.device("cpu"))[:, [1, 2, 0]] * torch.tensor([1.0, -1.0, 1.0])
    back = GaussianParams(150.0 * dirs, torch.tensor([[1.0, 0, 0, 0]]).expand(2048, 4).contiguous(),
                          torch.full((2048, 3), 6.0), torch.ones(2048), torch.randn(2048, 4, 3, generator=g) * 0.2)
    leaf = lambda p: GaussianParams(*(getattr(p, f).cuda().requires_grad_(f in ("means", "scales", "sh"))  # noqa: E731
                                      for f in ("means", "quats", "scales", "opacities", "sh")))
    return leaf(front), leaf(back)


def _step(front, back, K, single: bool) -> None:
    out = rasterize_layered(front, back, torch.eye(4, device="cuda"), K, W, H, sh_degree=1, single_draw=single,
                            backend="gsplat")
    (out.rgb.sum() + out.depth.mean() + out.alpha.sum()).backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gaussians", type=int, default=100_000)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    front, back = _scene(a.gaussians)
    K = torch.tensor([[800.0, 0.0, W / 2], [0.0, 800.0, H / 2], [0.0, 0.0, 1.0]], device="cuda")
    for single in (False, True):
        for _ in range(5):
            _step(front, back, K, single)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            _step(front, back, K, single)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / a.iters * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _step(front, back, K, single)
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"{'one draw' if single else 'two draws'}: {ms:.2f} ms fwd+bwd, {kernels} CUDA kernels")


if __name__ == "__main__":
    main()
