"""Stage-2 refine heads: residual corrections of an actor's Gaussians and of its per-frame poses.

Both heads start as an exact identity: their last layer is zero, and every residual is applied so
that a zero residual returns its input bit for bit (``x + 0``, ``s * exp(0)``, ``q ⊗ Exp(0)``,
``T · Exp_SE3(0)``), so quaternions stay unit and rendering at step 0 equals stage 1.

Gaussian vector layouts (object frame of the actor, metres):

``GAUSSIAN_INPUT_LAYOUT`` (``input_gaussian_dim`` = 14), what the head reads::

    xyz        [0:3]    mean, divided by half the box size (so cars of any size read alike)
    log_scale  [3:6]    log of the linear scales (m)
    color      [6:9]    SH degree-0 coefficients
    quat       [9:13]   rotation, wxyz, unit
    opacity    [13:14]  logit of the opacity

``GAUSSIAN_OUTPUT_LAYOUT`` (``output_gaussian_dim`` = 13), the residual the head writes::

    d_xyz        [0:3]    mean offset, 0.05 * |box size| * tanh (m)
    d_log_scale  [3:6]    scale factor exp(0.5 * tanh)
    d_color      [6:9]    added to the SH degree-0 coefficients
    d_rot        [9:12]   axis-angle (rad), applied as q ⊗ Exp(d_rot)
    d_opacity    [12:13]  added to the logit opacity
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

GAUSSIAN_INPUT_LAYOUT: dict[str, slice] = {
    "xyz": slice(0, 3), "log_scale": slice(3, 6), "color": slice(6, 9), "quat": slice(9, 13), "opacity": slice(13, 14)}
GAUSSIAN_OUTPUT_LAYOUT: dict[str, slice] = {
    "d_xyz": slice(0, 3), "d_log_scale": slice(3, 6), "d_color": slice(6, 9), "d_rot": slice(9, 12),
    "d_opacity": slice(12, 13)}
INPUT_GAUSSIAN_DIM = 14
OUTPUT_GAUSSIAN_DIM = 13
MAX_ROT_CORRECTION = 0.1
"""Bound (rad, per axis) of the pose head's rotation correction."""
MAX_TRANS_CORRECTION = 0.5
"""Bound (m, per axis) of the pose head's translation correction."""


def fourier_features(x: torch.Tensor, bands: int) -> torch.Tensor:
    """[..., D] -> [..., D * 2 * bands] sin/cos features at frequencies 2^k * pi."""
    freqs = (2.0 ** torch.arange(bands, dtype=x.dtype, device=x.device)) * math.pi
    xf = x[..., None] * freqs
    return torch.cat([xf.sin(), xf.cos()], dim=-1).flatten(-2)


def _zero_last(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class AttentionBlock(nn.Module):
    """Pre-LN self-attention + MLP over objects' Gaussians (no positional index: permutation-equivariant)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]; ``pad`` [B, N] bool marks padding rows (True), which no row
        attends to (their own outputs are meaningless and must be dropped by the caller)."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GaussianRefineHead(nn.Module):
    """Residuals ``[N, 13]`` (``GAUSSIAN_OUTPUT_LAYOUT``) of one object's Gaussians ``[N, 14]``
    (``GAUSSIAN_INPUT_LAYOUT``), or ``[K, P, 13]`` of K objects padded to P points with a mask: an
    embedding MLP, ``num_layers`` attention blocks across each object's Gaussians (never across
    objects, never onto padding), a zero-initialised output layer."""

    def __init__(self, input_dim: int = INPUT_GAUSSIAN_DIM, feature_dim: int = 128, num_layers: int = 2,
                 num_heads: int = 4, bands: int = 6) -> None:
        super().__init__()
        if input_dim != INPUT_GAUSSIAN_DIM:
            raise ValueError(f"input_gaussian_dim must be {INPUT_GAUSSIAN_DIM} (layout {list(GAUSSIAN_INPUT_LAYOUT)}), "
                             f"got {input_dim}")
        self.bands = bands
        self.embed = nn.Sequential(nn.Linear(input_dim + 3 * 2 * bands, feature_dim), nn.GELU(),
                                   nn.Linear(feature_dim, feature_dim))
        self.blocks = nn.ModuleList(AttentionBlock(feature_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(feature_dim)
        self.out = _zero_last(nn.Linear(feature_dim, OUTPUT_GAUSSIAN_DIM))

    def forward(self, g: torch.Tensor, checkpoint: bool = False,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One object: g [N, 14] -> (delta [N, 13], features [N, feature_dim]). K objects padded to P
        points: g [K, P, 14] with ``mask`` [K, P] bool (True: a real point; every object has one) ->
        ([K, P, 13], [K, P, feature_dim]), the padded rows' outputs meaningless (drop them). Each
        object's real rows equal its one-object result (padding is masked out of the attention)."""
        single = g.dim() == 2
        if single:
            g, mask = g[None], None
        pad = ~mask if mask is not None else None
        x = self.embed(torch.cat([g, fourier_features(g[..., GAUSSIAN_INPUT_LAYOUT["xyz"]], self.bands)], -1))
        for block in self.blocks:
            if checkpoint and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, pad, use_reentrant=False)
            else:
                x = block(x, pad)
        feat = self.norm(x)
        delta = self.out(feat)
        return (delta[0], feat[0]) if single else (delta, feat)


class PoseRefineHead(nn.Module):
    """Per-frame twists ``xi [F, 6] = [omega, v]`` of one object (or ``[K, F, 6]`` of K objects in
    one call) from its points and its box track.

    Object token: max- and mean-pooled point features (points in box-normalised object coordinates
    with their Gaussian vector; padding rows excluded from both pools). Per-frame pose features:
    normalised time, validity, the pose relative to the object's first valid frame (6D rotation,
    translation / |size|) and the processor's observed evidence (its correction of the box
    ``xi_obs`` (6) and weight (1), zero without), embedded to ``pose_feature_dim``; a
    ``num_layers`` transformer over each object's valid frames mixes them in time. Output bounded
    by ``MAX_ROT_CORRECTION`` rad and ``MAX_TRANS_CORRECTION`` m; zero at init."""

    FRAME_DIM = 2 + 6 + 3 + 7

    def __init__(self, input_dim: int = INPUT_GAUSSIAN_DIM, pose_feature_dim: int = 128, num_layers: int = 2,
                 num_heads: int = 4) -> None:
        super().__init__()
        d = pose_feature_dim
        self.point_mlp = nn.Sequential(nn.Linear(input_dim, d), nn.GELU(), nn.Linear(d, d))
        self.frame_embed = nn.Linear(self.FRAME_DIM + 2 * d, d)
        layer = nn.TransformerEncoderLayer(d, num_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out = _zero_last(nn.Linear(d, 6))

    def forward(self, g: torch.Tensor, poses: torch.Tensor, valid: torch.Tensor, size: torch.Tensor,
                evidence: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One object: g [N, 14] its Gaussian vectors; poses [F, 4, 4] object-to-segment poses the
        correction applies to; valid [F] bool (at least one True); size [3] box (l, w, h); evidence
        [F, 7] (``xi_obs`` scaled as the output bounds, weight) or None -> xi [F, 6] (zero where not
        valid). K objects: the same with a leading K (g [K, P, 14] padded to P points, ``mask``
        [K, P] bool True on real points, at least one per object) -> xi [K, F, 6]."""
        single = g.dim() == 2
        if single:
            g, poses, valid, size = g[None], poses[None], valid[None], size[None]
            evidence, mask = evidence[None] if evidence is not None else None, None
        feat = self.point_mlp(g)  # [K, P, d]
        if mask is None:
            token = torch.cat([feat.max(1).values, feat.mean(1)], -1)
        else:
            m = mask[..., None]
            top = feat.masked_fill(~m, float("-inf")).max(1).values
            mean = (feat * m.to(feat.dtype)).sum(1) / m.sum(1).clamp(min=1).to(feat.dtype)
            token = torch.cat([top, mean], -1)
        if evidence is None:
            evidence = poses.new_zeros(*poses.shape[:2], 7)
        frames = torch.cat([_frame_features(poses, valid, size), evidence.to(poses.dtype)], -1)  # [K, F, 18]
        x = self.frame_embed(torch.cat([frames, token[:, None].expand(-1, frames.shape[1], -1)], -1))
        x = self.temporal(x, src_key_padding_mask=~valid)
        raw = self.out(x)
        xi = torch.cat([MAX_ROT_CORRECTION * torch.tanh(raw[..., :3]), MAX_TRANS_CORRECTION * torch.tanh(raw[..., 3:])],
                       -1)
        xi = xi * valid[..., None].to(xi.dtype)
        return xi[0] if single else xi


def _frame_features(poses: torch.Tensor, valid: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """[K, F, 11] of poses [K, F, 4, 4], valid [K, F], size [K, 3]: normalised time, validity, box
    pose relative to each object's first valid frame (two rotation columns, translation / |size|)."""
    K, F = poses.shape[:2]
    first = valid.to(torch.uint8).argmax(-1)  # [K] first valid frame, on the device (no host read)
    ref = poses.gather(1, first[:, None, None, None].expand(K, 1, 4, 4))  # [K, 1, 4, 4]
    rel = torch.linalg.solve(ref, poses)  # ref^-1 @ poses: motion in the reference's object axes
    time = torch.linspace(0, 1, F, dtype=poses.dtype, device=poses.device).expand(K, F)
    scale = size.norm(dim=-1).clamp(min=1e-3)[:, None, None]
    return torch.cat([time[..., None], valid[..., None].to(poses.dtype), rel[..., :3, 0], rel[..., :3, 1],
                      rel[..., :3, 3] / scale], -1)
