"""A foreground layer over a background layer (the sky dome), in one rasteriser call or two.

The background is composited *behind* the foreground whatever its geometry, after it is divided by
its own accumulated opacity (``normalize``: the dome is an opaque surface whose Gaussians' falloff
would otherwise darken it) and blended with the sources' sky warp (``sky``):

    bg = lerp(normalize(dome_rgb, dome_alpha), sky_rgb, sky_weight)
    rgb = fg_rgb + (1 - fg_alpha) * bg

:func:`rasterize_layered` gives that either with two draws (foreground, dome; the reference) or
with **one** draw of both sets with 9-channel features (one projection, one tile sort, one
compositing kernel forward and backward instead of two; SH are evaluated here instead of in the
rasteriser):

    channel   0:3      3:6        6          7       8
    front     fg rgb   0          0          1       camera z
    back      0        dome rgb   1          0       0

Once every front Gaussian of a pixel composites before every back one, the channels are
``fg_rgb``, ``T * dome_rgb``, ``T * dome_alpha``, ``fg_alpha`` and ``fg_alpha * fg_depth`` with
``T = 1 - fg_alpha``, so the normalised dome is the ratio of channels 3:6 and 6 (independent of
``T``) and the foreground's outputs are exactly the foreground-alone draw's.

Order: the rasteriser sorts by camera z of the means, and a dome Gaussian off to the side can have
a smaller z than a foreground one far ahead in the same tile (a dome of radius 2x the cloud's
half-diagonal guarantees the order only along a single ray). So each back Gaussian in front of the
near plane is moved along its camera ray, ``p' = o + k (p - o)``, with its scales times ``k`` and
``k = (z + shift) / z`` (``shift`` > every front Gaussian's z): the perspective (EWA) projection of
that Gaussian is exactly the same 2D Gaussian (mean on the same ray, ``J' = J / k``,
``Sigma' = k^2 Sigma``; gsplat's x/z clamp is scale-free), its SH direction is the same, only its
sort key grows, and ``z + shift`` keeps the back Gaussians' own order. ``k`` is detached: for a fixed
``k`` the draw is the same function of (means, scales), so gradients are exact too. No host sync.

Where the one draw differs (the rasteriser's early stop, T <= 1e-4, now applies to the product
``T_fg * T_dome``): behind a nearly opaque foreground (``T_fg`` < ~0.1) dome Gaussians whose own
alpha would take the product to <= 1e-4 are left out (near dome centres, alpha ~ 0.999), and the
pixel stops there. The composite then differs by at most ``T_fg * |bg|`` (so < 0.1 * |bg|, and
< 1e-3 where ``T_fg`` < 1e-3), and only on those pixels; the normalised dome colour of the pixels
where it is kept is a weighted mean of fewer dome Gaussians. ``background`` is an estimate there
(un-attenuated: ``T``-divided) and 0 where the foreground is opaque (``T_fg`` <= 1e-4), so the sky
loss, which reads the background on every sky pixel, draws twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from evolsplat_ns.geometry import invert_rigid

from . import evaluate_sh, rasterize, rasterize_feature_blocks

if TYPE_CHECKING:  # node imports render.sh: a runtime import here would be circular
    from evolsplat_ns.model.node import GaussianParams

Front = Union["GaussianParams", Sequence["GaussianParams"]]
"""A foreground: one set of Gaussians, or parts drawn as one set in order."""
NORMALIZE_MIN_ALPHA = 0.05
"""Background pixels whose own opacity is above this are divided by it (below: left as they are)."""
T_MIN = 1e-4
"""The rasteriser's transmittance floor: compositing stops before a Gaussian would reach it."""
NEAR_PLANE = 0.01
"""Camera-z culling plane (metres) of both draws, ``rasterize``'s default."""


@dataclass
class LayeredImage:
    """One camera's render, H x W pixels.

    rgb: [H, W, 3] foreground over the background.
    depth: [H, W, 1] the foreground's expected camera z (OpenCV, metres), ``rasterize``'s "ED".
    alpha: [H, W, 1] the foreground's accumulated opacity.
    background: [H, W, 3] the background alone (normalised, sky-blended), or None without one
        (one draw: see the module docstring for where it is an estimate).
    meta: the foreground draw's ``RenderOutput.meta`` (two draws; None for one draw).
    """

    rgb: Tensor
    depth: Tensor
    alpha: Tensor
    background: Optional[Tensor]
    meta: Optional[dict]


def normalize_by_alpha(rgb: Tensor, alpha: Tensor) -> Tensor:
    """``rgb`` [..., 3] / ``alpha`` [..., 1] where alpha > :data:`NORMALIZE_MIN_ALPHA`, else rgb."""
    return torch.where(alpha > NORMALIZE_MIN_ALPHA, rgb / alpha.clamp(min=NORMALIZE_MIN_ALPHA), rgb)


def _over(fg_rgb: Tensor, fg_alpha: Tensor, bg: Tensor, sky: Optional[tuple[Tensor, Tensor]]
          ) -> tuple[Tensor, Tensor]:
    """(rgb, background): ``bg`` [H, W, 3] blended with the sky warp (rgb [H, W, 3], weight
    [H, W]) where it sees the sky, then composited behind the foreground (rgb [H, W, 3], alpha
    [H, W, 1])."""
    if sky is not None:  # the sources' sky where they see it, the dome elsewhere
        bg = torch.lerp(bg, sky[0].float(), sky[1][..., None].float())
    return fg_rgb + (1.0 - fg_alpha) * bg, bg


def rasterize_layered(front: Front, back: Optional[GaussianParams], c2w: Tensor, K: Tensor,
                      width: int, height: int, *, sh_degree: int, normalize: bool = True,
                      sky: Optional[tuple[Tensor, Tensor]] = None, single_draw: bool = True,
                      backend: str = "auto") -> LayeredImage:
    """Render ``front`` (segment frame) with ``back`` composited behind it, for one camera.

    Args:
        front, back: Gaussians (means [N, 3] segment frame, quats [N, 4], scales [N, 3] linear,
            opacities [N], sh [N, K, 3]); fp32. ``front`` may be a sequence of parts drawn as
            one set (e.g. the static scene and the posed actors; joined inside the draw).
            ``back`` None: the foreground alone.
        c2w: [4, 4] OpenCV camera-to-segment pose. K: [3, 3] pixels.
        sh_degree: SH degree of both sets.
        normalize: divide the background by its own opacity (:func:`normalize_by_alpha`).
        sky: (rgb [H, W, 3], weight [H, W]) blended into the background by weight.
        single_draw: one rasteriser call for both sets (module docstring) instead of two.
        backend: "auto", "gsplat" or "reference" (:func:`~evolsplat_ns.model.render.rasterize`).
    """
    if back is None or not single_draw:
        parts = _parts(front)
        front = parts[0] if len(parts) == 1 else _cat(parts)
        return _two_draws(front, back, c2w, K, width, height, sh_degree, normalize, sky, backend)
    return _one_draw(front, back, c2w, K, width, height, sh_degree, normalize, sky, backend)


def _two_draws(front: GaussianParams, back: Optional[GaussianParams], c2w: Tensor, K: Tensor, width: int,
               height: int, sh_degree: int, normalize: bool, sky: Optional[tuple[Tensor, Tensor]],
               backend: str) -> LayeredImage:
    """The reference: the foreground, then the background alone, composited here."""
    # A rigid inverse: torch.linalg.inv checks for singularity on the host (a device sync).
    viewmat = invert_rigid(c2w)[None]

    def draw(g: GaussianParams):
        return rasterize(g.means, g.quats, g.scales, g.opacities, g.sh, viewmat, K[None], width, height,
                         sh_degree=sh_degree, backend=backend)

    fg = draw(front)
    rgb, alpha, bg = fg.rgb[0], fg.alpha[0], None
    if back is not None:
        dome = draw(back)
        bg = normalize_by_alpha(dome.rgb[0], dome.alpha[0]) if normalize else dome.rgb[0]
        rgb, bg = _over(rgb, alpha, bg, sky)
    return LayeredImage(rgb, fg.depth[0], alpha, bg, fg.meta)


def rasterize_layered_blocks(fronts: Sequence[Front], back: Optional[GaussianParams], c2ws: Tensor,
                             Ks: Tensor, width: int, height: int, *, sh_degree: int, normalize: bool = True,
                             sky: Optional[tuple[Tensor, Tensor]] = None, backend: str = "auto") -> LayeredImage:
    """:func:`rasterize_layered` (one draw) for C cameras at once, each with its own foreground.

    Args:
        fronts: C foregrounds (segment frame, fp32), ``fronts[c]`` seen by camera ``c`` only
            (per target view-dependent Gaussians); each one set or parts, as in
            :func:`rasterize_layered`.
        back: the background all cameras share (each draws its own copy, moved behind its own
            foreground), or None.
        c2ws: [C, 4, 4] OpenCV camera-to-segment poses. Ks: [C, 3, 3] pixels.
        sky: (rgb [C, H, W, 3], weight [C, H, W]) per camera, or None.
        sh_degree, normalize, backend: as :func:`rasterize_layered`.
    Returns:
        A :class:`LayeredImage` whose fields have a leading camera axis: rgb [C, H, W, 3], ...
    """
    if len(fronts) != c2ws.shape[0] or Ks.shape[0] != c2ws.shape[0]:
        raise ValueError(f"rasterize_layered_blocks: {len(fronts)} foregrounds for {c2ws.shape[0]} poses and "
                         f"{Ks.shape[0]} intrinsics")
    return _draw(list(fronts), back, c2ws, Ks, width, height, sh_degree, normalize, sky, backend)


def _one_draw(front: Front, back: GaussianParams, c2w: Tensor, K: Tensor, width: int, height: int,
              sh_degree: int, normalize: bool, sky: Optional[tuple[Tensor, Tensor]], backend: str) -> LayeredImage:
    """Both sets in one rasteriser call with the 9-channel features of the module docstring."""
    image = _draw([front], back, c2w[None], K[None], width, height, sh_degree, normalize, sky, backend)
    return LayeredImage(image.rgb[0], image.depth[0], image.alpha[0], image.background[0], None)


def _draw(fronts: list[Front], back: Optional[GaussianParams], c2ws: Tensor, Ks: Tensor, width: int,
          height: int, sh_degree: int, normalize: bool, sky: Optional[tuple[Tensor, Tensor]],
          backend: str) -> LayeredImage:
    """C cameras' foregrounds with a copy of ``back`` each in one rasteriser call (module docstring's
    9 channels); fields [C, H, W, ...]. With one camera no row needs its camera looked up."""
    C, sizes = len(fronts), [sum(len(p) for p in _parts(f)) for f in fronts]
    # One camera: its parts are joined inside _prepare (one copy of each field, not two).
    front = _parts(fronts[0]) if C == 1 else [_cat([p for f in fronts for p in _parts(f)])]
    if back is None:
        back = _fields(front[0], lambda name, t: t[:0])
    elif C > 1:
        back = _fields(back, lambda name, t: t.repeat(C, *(1,) * (t.dim() - 1)))
    blocks = None if C == 1 else _blocks(sizes + [len(back) // C] * C, c2ws.device)  # [N + C * B]
    means, quats, scales, opacities, features = _prepare(front, back, blocks, c2ws, sh_degree, backend)
    out, _ = rasterize_feature_blocks(means, quats, scales, opacities, features, blocks, invert_rigid(c2ws), Ks,
                                      width, height, near_plane=NEAR_PLANE, backend=backend)
    return _finish(out, normalize, sky)


def _prepare(front: list[GaussianParams], back: GaussianParams, blocks: Optional[Tensor], c2ws: Tensor,
             sh_degree: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The one draw's rasteriser inputs for ``front`` (parts drawn as one set of N rows, in order)
    then ``back`` (B rows; with ``blocks`` [N + B] a camera per row, else every row for the one
    camera ``c2ws`` [1, 4, 4], OpenCV camera-to-segment): means [N + B, 3] (segment frame; back
    ones moved behind the front, :func:`_behind`), quats, scales, opacities and the 9-channel
    features [N + B, 9]."""
    def joined(name: str, last: Tensor) -> Tensor:  # the parts' field, then ``last``: one copy
        return torch.cat([*(getattr(p, name) for p in front), last])

    C, n = c2ws.shape[0], sum(len(p) for p in front)
    row = (lambda t: t[0]) if blocks is None else (lambda t: t[blocks])  # noqa: E731
    origin, axis = row(c2ws[:, :3, 3]), row(c2ws[:, :3, 2])  # camera centre and z axis (segment frame)
    dirs = joined("means", back.means) - origin  # [N + B, 3] camera centre -> Gaussian
    z = dirs @ axis if blocks is None else (dirs * axis).sum(-1)  # [N + B] camera z
    shift = _sort_shift(z[:n], None if blocks is None else blocks[:n], C)
    back_origin = origin if blocks is None else origin[n:]
    back_means, back_scales = _behind(back.scales, back_origin, dirs[n:], z[n:],
                                      shift if blocks is None else shift[blocks[n:]])
    # The moved back Gaussians keep their directions: SH along the original ones.
    rgb = evaluate_sh(sh_degree, dirs, joined("sh", back.sh), backend)
    features = torch.cat([_front_features(rgb[:n], z[:n]), _back_features(rgb[n:])])
    return (joined("means", back_means), joined("quats", back.quats), joined("scales", back_scales),
            joined("opacities", back.opacities), features)


def _finish(out: Tensor, normalize: bool, sky: Optional[tuple[Tensor, Tensor]]) -> LayeredImage:
    """The layered image from the draw's 9 channels ``out`` [C, H, W, 9] (module docstring) and
    the sky warp (rgb [C, H, W, 3], weight [C, H, W]; or [H, W, ...] for one camera)."""
    fg_rgb, dome_rgb, dome_alpha, fg_alpha, fg_z = out.split([3, 3, 1, 1, 1], dim=-1)
    bg = _unattenuated(dome_rgb, dome_alpha, 1.0 - fg_alpha, normalize)
    rgb, bg = _over(fg_rgb, fg_alpha, bg, sky)
    # gsplat's "ED": accumulated depth over accumulated alpha.
    return LayeredImage(rgb, fg_z / fg_alpha.clamp(min=1e-10), fg_alpha, bg, None)


_RASTERISED = ("means", "quats", "scales", "opacities", "sh")


def _parts(front: Front) -> list[GaussianParams]:
    """The non-empty parts of a foreground given as one set or as parts (at least one part)."""
    if not isinstance(front, (list, tuple)):
        return [front]
    parts = [p for p in front if len(p)]
    return parts or [front[0]]


def _fields(g: GaussianParams, fn) -> GaussianParams:
    """``g`` with ``fn(name, tensor)`` applied to its rasterised fields (no node index kept)."""
    return replace(g, index=None, offset=None, **{name: fn(name, getattr(g, name)) for name in _RASTERISED})


def _cat(parts: list[GaussianParams]) -> GaussianParams:
    """The rasterised fields of ``parts`` concatenated in order."""
    return _fields(parts[0], lambda name, _: torch.cat([getattr(p, name) for p in parts]))


def _blocks(sizes: list[int], device: torch.device) -> Tensor:
    """[sum(sizes)] long camera index of each row: fronts of cameras 0..C-1 (``sizes[:C]``), then
    the backs' copies (``sizes[C:]``), built on the host (sizes are host numbers) and copied once."""
    C = len(sizes) // 2
    cams = torch.arange(C).repeat(2)
    return torch.repeat_interleave(cams, torch.tensor(sizes)).to(device, non_blocking=True)


def _sort_shift(z_front: Tensor, front_blocks: Optional[Tensor], C: int) -> Tensor | float:
    """How far back Gaussians move in camera z so that they sort after every front one: beyond
    the largest front z ``z_front`` [N] (per camera [C] with ``front_blocks`` [N]); +1 m and
    0.1 %: a margin well above float32 rounding of the projected z."""
    if front_blocks is None:
        return z_front.detach().max().clamp(min=0.0) * 1.001 + 1.0 if len(z_front) else 1.0
    far = z_front.new_zeros(C).scatter_reduce(0, front_blocks, z_front.detach(), "amax", include_self=True)
    return far * 1.001 + 1.0


def _behind(back_scales: Tensor, origin: Tensor, dirs: Tensor, z_back: Tensor, shift: Tensor | float
            ) -> tuple[Tensor, Tensor]:
    """Back means [B, 3] (``dirs`` [B, 3] from the camera centre ``origin`` [3] or [B, 3], camera z
    ``z_back`` [B]) moved along their camera rays to camera z ``z_back + shift`` (scalar or [B],
    :func:`_sort_shift`), and their scales ``back_scales`` [B, 3] grown alike: the same 2D
    Gaussians, sorted after the foreground (module docstring). Those before the near plane stay (culled there anyway)."""
    # The unselected branch may divide by 0 (inf, no gradient: k is detached).
    k = torch.where(z_back >= NEAR_PLANE, 1.0 + shift / z_back, 1.0).detach()[:, None]
    return origin + k * dirs, back_scales * k


def _front_features(rgb: Tensor, z: Tensor) -> Tensor:
    """[N, 9] rows (rgb, 0, 0, 0, 0, 1, z) of foreground Gaussians with rgb [N, 3], camera z [N]."""
    return torch.cat([rgb, rgb.new_zeros(len(rgb), 4), rgb.new_ones(len(rgb), 1), z[:, None]], dim=-1)


def _back_features(rgb: Tensor) -> Tensor:
    """[B, 9] rows (0, 0, 0, rgb, 1, 0, 0) of background Gaussians with rgb [B, 3]."""
    return F.pad(torch.cat([rgb, rgb.new_ones(len(rgb), 1)], dim=-1), (3, 2))


def _unattenuated(dome_rgb: Tensor, dome_alpha: Tensor, trans: Tensor, normalize: bool) -> Tensor:
    """The background alone [H, W, 3] from its channels attenuated by the foreground's
    transmittance ``trans`` [H, W, 1] (``T * rgb`` [H, W, 3], ``T * alpha`` [H, W, 1]).

    Normalised: the ratio rgb / alpha, where the un-attenuated alpha (``dome_alpha / T``) is above
    the threshold; there the gradients stay bounded (1 / alpha < 20) as ``T`` -> 0. Elsewhere
    (and unnormalised) ``dome_rgb / T``, with ``T`` floored at the rasteriser's 1e-4 (below it no
    background was composited: the result is ~0 and its composite ``T * bg`` exact).
    """
    floored = trans.clamp(min=T_MIN)
    if not normalize:
        return dome_rgb / floored
    # One division by the chosen [H, W, 1] denominator rather than two [H, W, 3] quotients and a
    # select: the same values, half the kernels forward and backward.
    return dome_rgb / torch.where(dome_alpha > NORMALIZE_MIN_ALPHA * trans, dome_alpha.clamp(min=1e-10), floored)
