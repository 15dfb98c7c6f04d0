"""Time the Gaussian renderer: ms per frame, forward only and forward + backward.

Random Gaussians 3-12 m in front of one OpenCV camera (identity world-to-camera) at the given
resolution. On CPU "auto" resolves to the PyTorch reference backend.

    python benchmarks/render_bench.py --n 5000 --width 160 --height 120 --backend auto
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from evolsplat_ns.model.render import BACKENDS, rasterize


def make_scene(n: int, width: int, height: int, device: torch.device) -> list[torch.Tensor]:
    """[means, quats, scales, opacities, colors, viewmats, Ks]; Gaussians fill the view."""
    g = torch.Generator().manual_seed(0)
    focal = 0.8 * width
    depth = torch.rand(n, generator=g) * 9.0 + 3.0
    # Spread over the frustum: pixel-space uniform, back-projected at each depth.
    uv = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - torch.tensor(
        [width / 2, height / 2]
    )
    means = torch.cat([uv * depth[:, None] / focal, depth[:, None]], dim=-1)
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    Ks = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    return [t.to(device) for t in (means, quats, scales, opacities, colors, torch.eye(4)[None],
                                   Ks[None])]


def time_ms(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call (CUDA synchronised)."""
    times = []
    for i in range(iters + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of Gaussians")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    scene = make_scene(args.n, args.width, args.height, device)
    params = [t.requires_grad_(True) for t in scene[:5]]
    size = (args.width, args.height)

    def forward() -> None:
        with torch.no_grad():
            rasterize(*scene, *size, backend=args.backend)

    def forward_backward() -> None:
        out = rasterize(*scene, *size, backend=args.backend)
        (out.rgb.sum() + out.alpha.sum()).backward()
        for p in params:
            p.grad = None

    name = rasterize(*scene, *size, backend=args.backend).meta["backend"]
    fwd = time_ms(forward, args.iters, device)
    fwd_bwd = time_ms(forward_backward, args.iters, device)
    print(
        f"backend={name} device={device} threads={torch.get_num_threads()} n={args.n} "
        f"{args.width}x{args.height}: forward {fwd:.2f} ms/frame, "
        f"forward+backward {fwd_bwd:.2f} ms/frame"
    )


if __name__ == "__main__":
    main()
