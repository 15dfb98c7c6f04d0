"""Image and depth metrics. Perceptual metrics are only ever computed with pretrained weights.

- ``lpips``: the ``lpips`` package ships its linear heads but loads the AlexNet backbone through
  torchvision's weight download. We look for those weights where torch keeps them
  (``$TORCH_HOME/hub/checkpoints``) or at ``EVOLSPLAT_LPIPS_BACKBONE``; without them LPIPS is
  reported as unavailable with the reason, never computed on a random backbone.
- ``stlpips``: shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022; package ``stlpips-pytorch``, the
  ``metrics`` extra), AlexNet variant. Its backbone *and* linear heads ship inside the package, so
  it works offline. It is a different metric from LPIPS (numbers are not comparable with papers'
  LPIPS) and is always reported under its own name.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from typing import Optional

import torch
from pytorch_msssim import ssim

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of images in [0, 1], any matching shape."""
    mse = torch.mean((pred - gt) ** 2)
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def ssim_value(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SSIM of [H, W, 3] images in [0, 1]."""
    w = min(11, pred.shape[0], pred.shape[1])
    w = w if w % 2 else w - 1
    return ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0, win_size=w)


def alexnet_weights_path() -> Path | None:
    """Pretrained AlexNet weights for LPIPS if present locally (never downloaded)."""
    env = os.environ.get("EVOLSPLAT_LPIPS_BACKBONE")
    if env:
        return Path(env) if Path(env).is_file() else None
    p = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    return p if p.is_file() else None


@functools.lru_cache(maxsize=1)
def _lpips_net(device: str):
    import lpips
    import torchvision

    path = alexnet_weights_path()
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    alex = torchvision.models.alexnet()
    alex.load_state_dict(torch.load(path, map_location="cpu"))
    # lpips' alexnet wrapper slices torchvision's feature extractor into 5 stages.
    feats = alex.features
    for stage, (a, b) in zip([net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5],
                             [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]):
        for i in range(a, b):
            stage._modules[str(i)].load_state_dict(feats[i].state_dict())
    return net.eval().to(device)


def lpips_status() -> tuple[bool, str]:
    """(available, reason)."""
    if alexnet_weights_path() is None:
        return False, (f"LPIPS unavailable: pretrained AlexNet weights ({ALEXNET_FILE}) not found in "
                       f"{Path(torch.hub.get_dir()) / 'checkpoints'} nor at $EVOLSPLAT_LPIPS_BACKBONE; "
                       "a random backbone would give meaningless numbers, so none is reported")
    return True, "lpips (AlexNet, pretrained)"


@torch.no_grad()
def lpips_value(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """LPIPS of [H, W, 3] images in [0, 1]; call only when :func:`lpips_status` is available."""
    net = _lpips_net(str(pred.device))
    to = lambda x: x.permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
    return net(to(pred), to(gt)).reshape(())


STLPIPS_WEIGHTS = "weights/vST0.0/alex_shift_tolerant.pth"
"""The shipped shift-tolerant AlexNet (backbone + linear heads), relative to the package."""


def _stlpips_weights() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / STLPIPS_WEIGHTS
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def stlpips_status() -> tuple[bool, str]:
    """(available, reason) of ``stlpips``: the package, its shipped weights and its imports."""
    path = _stlpips_weights()
    if path is None:
        return False, ("stlpips unavailable: install the metrics extra (pip install -e '.[metrics]': "
                       "stlpips-pytorch with its shipped weights, and torchsummary which it imports)")
    try:
        import stlpips_pytorch.stlpips  # noqa: F401
    except ImportError as e:
        return False, f"stlpips unavailable: stlpips-pytorch does not import ({e}); pip install -e '.[metrics]'"
    return True, f"stlpips (shift-tolerant LPIPS, AlexNet, shipped weights {path.name})"


@functools.lru_cache(maxsize=1)
def _stlpips_net(device: str):
    from stlpips_pytorch import stlpips

    path = _stlpips_weights()
    net = stlpips.LPIPS(net="alex", variant="shift_tolerant", pretrained=True, model_path=str(path), verbose=False)
    # The package loads with strict=False: check that every weight came from the file (the
    # ``lins.*`` entries alias ``lin0..4``), so a renamed key can never leave a random layer.
    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded = {t.data_ptr() for k, t in net.state_dict().items() if k in state}
    missing = [k for k, t in net.state_dict().items() if k not in state and t.data_ptr() not in loaded]
    if missing:
        raise RuntimeError(f"stlpips weights {path} lack {missing[:4]}: refusing to report a partly random network")
    return net.eval().to(device)


@torch.no_grad()
def stlpips_value(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Shift-tolerant LPIPS of [H, W, 3] images in [0, 1] (0 = identical); call only when
    :func:`stlpips_status` is available."""
    net = _stlpips_net(str(pred.device))
    to = lambda x: x.permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
    return net(to(pred), to(gt)).reshape(())


def image_metrics(pred: torch.Tensor, gt: torch.Tensor, lpips: bool = True) -> dict[str, float]:
    """psnr, ssim and, with ``lpips``, the perceptual metrics whose pretrained weights exist:
    ``lpips`` (AlexNet backbone present) and ``stlpips`` (stlpips-pytorch installed), of [H, W, 3]
    images in [0, 1]."""
    out = {"psnr": float(psnr(pred, gt)), "ssim": float(ssim_value(pred, gt))}
    if lpips and lpips_status()[0]:
        out["lpips"] = float(lpips_value(pred, gt))
    if lpips and stlpips_status()[0]:
        out["stlpips"] = float(stlpips_value(pred, gt))
    return out


def perceptual_status() -> dict:
    """Availability of each perceptual metric, with the reason when one is not reported: the
    ``*_available`` / ``*_note`` keys of a metrics report."""
    out: dict = {}
    for name, (ok, reason) in (("lpips", lpips_status()), ("stlpips", stlpips_status())):
        out[f"{name}_available"] = ok
        if not ok:
            out[f"{name}_note"] = reason
    return out


def depth_metrics(pred_depth: torch.Tensor, uv: torch.Tensor, gt_depth: torch.Tensor) -> dict[str, float]:
    """Depth error at LiDAR points: abs rel and RMSE (metres).

    Args:
        pred_depth: [H, W, 1] rendered OpenCV z-depth; uv: [N, 2] pixel coordinates of the LiDAR
            points in this camera; gt_depth: [N] their camera z.
    """
    H, W = pred_depth.shape[:2]
    ix, iy = uv[:, 0].long(), uv[:, 1].long()
    ok = (gt_depth > 0.5) & (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    if not ok.any():
        return {}
    p, g = pred_depth[iy[ok], ix[ok], 0], gt_depth[ok]
    return {"depth_abs_rel": float(((p - g).abs() / g).mean()), "depth_rmse": float(((p - g) ** 2).mean().sqrt())}


# -- region metrics (dynamic vs static pixels) and temporal consistency --------------------------


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """[H, W] bool mask grown by ``radius`` pixels (square structuring element)."""
    if radius <= 0:
        return mask
    m = mask.float()[None, None]
    return torch.nn.functional.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0


def masked_psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB) over the pixels of ``mask`` [H, W] of images [H, W, 3] in [0, 1] (nan if empty)."""
    if not mask.any():
        return float("nan")
    mse = ((pred - gt) ** 2)[mask].mean()
    return float(-10.0 * torch.log10(mse.clamp(min=1e-10)))


def ssim_map(pred: torch.Tensor, gt: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[H, W] per-pixel SSIM of images [H, W, 3] in [0, 1] (Gaussian window, channel mean; borders
    reflect-padded), the map whose mean over a region is that region's SSIM."""
    win = min(win, pred.shape[0], pred.shape[1])
    win = win if win % 2 else win - 1
    x = torch.arange(win, dtype=pred.dtype, device=pred.device) - win // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, win, win)

    def blur(img: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(img, [win // 2] * 4, mode="reflect")
        return torch.nn.functional.conv2d(padded, kernel, groups=3)

    p, q = pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]
    mp, mq = blur(p), blur(q)
    vp, vq, cov = blur(p * p) - mp ** 2, blur(q * q) - mq ** 2, blur(p * q) - mp * mq
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))
    return s[0].mean(0)


def masked_region_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, inside: str,
                          outside: str) -> dict[str, float]:
    """PSNR and mean SSIM-map value inside ``mask`` [H, W] (keys ``psnr_{inside}``, ``ssim_{inside}``;
    absent when the mask is empty) and outside it (``psnr_{outside}``, ``ssim_{outside}``; absent
    when the mask covers everything)."""
    mask = mask.to(pred.device).bool()
    smap = ssim_map(pred, gt)
    out = {}
    for name, region in ((outside, ~mask), (inside, mask)):
        if region.any():
            out[f"psnr_{name}"], out[f"ssim_{name}"] = masked_psnr(pred, gt, region), float(smap[region].mean())
    return out


def region_metrics(pred: torch.Tensor, gt: torch.Tensor, dynamic: torch.Tensor, radius: int) -> dict[str, float]:
    """PSNR/SSIM on dynamic pixels (``dynamic`` [H, W] dilated by ``radius`` px) and on the rest.

    Keys ``psnr_dynamic``, ``ssim_dynamic`` (absent when the view has no dynamic pixel),
    ``psnr_static``, ``ssim_static``; definitions in docs/metrics.md."""
    return masked_region_metrics(pred, gt, dilate(dynamic.to(pred.device), radius), "dynamic", "static")


def warp_residual(frame_t: torch.Tensor, frame_next: torch.Tensor, flow: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``frame_t(p) - frame_next(p + flow(p))`` [H, W, 3] (images [H, W, 3], ``flow`` [H, W, 2]
    pixels t -> t+1, dx right, dy down; bilinear) and the pixels of ``mask`` [H, W] whose target
    stays in the image [H, W] bool."""
    H, W = mask.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=flow.device), torch.arange(W, device=flow.device), indexing="ij")
    x = xs + 0.5 + flow[..., 0]
    y = ys + 0.5 + flow[..., 1]
    inside = (x >= 0) & (x <= W) & (y >= 0) & (y <= H) & mask.to(flow.device)
    grid = torch.stack([2 * x / W - 1, 2 * y / H - 1], dim=-1)[None].to(frame_next.dtype)
    warped = torch.nn.functional.grid_sample(frame_next.permute(2, 0, 1)[None], grid, align_corners=False)[0]
    return frame_t - warped.permute(1, 2, 0), inside


def warp_error(frame_t: torch.Tensor, frame_next: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor,
               reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> float:
    """Mean L1 (over channels, then pixels) over ``mask`` [H, W] of the warp residual
    :func:`warp_residual` of (``frame_t``, ``frame_next``); with ``reference`` (the real pair at t
    and t+1) of the difference of the two pairs' residuals instead. nan when no pixel remains."""
    residual, inside = warp_residual(frame_t, frame_next, flow, mask)
    if reference is not None:
        residual = residual - warp_residual(reference[0], reference[1], flow, mask)[0]
    if not inside.any():
        return float("nan")
    return float(residual.abs().mean(-1)[inside].mean())
