"""MLP heads that decode per-Gaussian features into Gaussian attributes, one module per attribute.

Inputs are per-Gaussian feature rows; "view features" describe the **target** camera as seen from
the Gaussian (segment frame): unit direction camera-centre -> Gaussian (3), log distance (1) and log
pixel footprint ``distance / focal`` (1, metres per target pixel at that depth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evolsplat_ns.model.render.sh import num_sh_bases

VIEW_FEATURE_DIM = 5
_INPLACE = (nn.ReLU, nn.LeakyReLU)


def mlp(
    in_dim: int, hidden: int, out_dim: int, num_layers: int = 3, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """``num_layers`` linear layers (``num_layers - 1`` hidden of width ``hidden``) with ``activation``."""
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            # In place where the activation allows it: a Linear's backward needs its input, not its
            # output, so this saves one [M, hidden] tensor per layer (memory traffic at 1M points).
            layers.append(activation(inplace=True) if activation in _INPLACE else activation())
    return nn.Sequential(*layers)


def view_features(points: torch.Tensor, target_c2w: torch.Tensor, target_K: torch.Tensor) -> torch.Tensor:
    """[M, 5] target-view features of ``points`` [M, 3] (segment frame).

    Args:
        target_c2w: [4, 4] OpenCV camera-to-segment of the target camera, or [M, 4, 4]: each
            point's own target (several targets' rows in one call).
        target_K: [3, 3] target pinhole intrinsics (pixels), or [M, 3, 3] alike.
    """
    ray = points - target_c2w[..., :3, 3]
    dist = ray.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    focal = 0.5 * (target_K[..., 0, 0] + target_K[..., 1, 1])
    return torch.cat([ray / dist, dist.log(), (dist / focal[..., None]).log()], dim=-1)


def aggregate_views(
    colors: torch.Tensor, occlusion: torch.Tensor, valid: torch.Tensor, occlusion_tau: float
) -> torch.Tensor:
    """Visibility-weighted mean and variance across source views.

    Each view's weight is ``valid * exp(-max(occlusion, 0) / occlusion_tau)`` (views in which the
    Gaussian sits behind the visible surface count less), normalised over views.

    Args:
        colors: [M, S, P, 3] window colours; occlusion: [M, S, 1] metres; valid: [M, S] bool.
    Returns:
        [M, 2 * (3P + 1)] weighted mean then variance of the per-view rows [colours, occlusion].
    """
    per_view = torch.cat([colors.flatten(2), occlusion], dim=-1)  # [M, S, 3P+1]
    weight = valid.to(per_view.dtype)[..., None] * torch.exp(-occlusion.clamp(min=0) / occlusion_tau)
    weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=1e-6)
    mean = (weight * per_view).sum(dim=1)
    var = (weight * (per_view - mean[:, None]) ** 2).sum(dim=1)
    return torch.cat([mean, var], dim=-1)


def aggregated_dim(window_size: int) -> int:
    """Width of :func:`aggregate_views`' output for windows of ``window_size`` pixels."""
    return 2 * (3 * window_size + 1)


class ColorHead(nn.Module):
    """SH colour [M, (sh_degree+1)^2, 3] from aggregated image windows, volume feature and target view.

    The output is a residual on the anchor colour: the DC band adds to the node's ``features_dc``,
    so an untrained head already renders the point-cloud colours.
    """

    def __init__(self, window_size: int, volume_dim: int, sh_degree: int = 1, hidden: int = 128) -> None:
        super().__init__()
        self.num_bases = num_sh_bases(sh_degree)
        in_dim = aggregated_dim(window_size) + volume_dim + VIEW_FEATURE_DIM
        self.net = mlp(in_dim, hidden, 3 * self.num_bases)

    def forward(
        self,
        image_feat: torch.Tensor,
        volume_feat: torch.Tensor,
        view_feat: torch.Tensor,
        anchor_dc: torch.Tensor,
    ) -> torch.Tensor:
        """[M, A] aggregated windows, [M, C] volume, [M, 5] view, [M, 3] anchor DC -> SH [M, bases, 3]."""
        sh = self.net(torch.cat([image_feat, volume_feat, view_feat], dim=-1)).reshape(-1, self.num_bases, 3)
        return torch.cat([sh[:, :1] + anchor_dc[:, None], sh[:, 1:]], dim=1)


class ScaleRotationHead(nn.Module):
    """Linear scales [M, 3] (residual on the node's log scale) and unit wxyz quaternions [M, 4]."""

    def __init__(self, volume_dim: int, hidden: int = 64, max_log_residual: float = 3.0) -> None:
        super().__init__()
        self.max_log_residual = max_log_residual
        self.net = mlp(volume_dim + VIEW_FEATURE_DIM, hidden, 7, num_layers=2)
        # A buffer (not in checkpoints) rather than a tensor made per call: no host-to-device copy.
        self.register_buffer("identity", torch.tensor([1.0, 0.0, 0.0, 0.0]), persistent=False)

    def forward(
        self, volume_feat: torch.Tensor, view_feat: torch.Tensor, base_log_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, C] volume, [M, 5] view, [M, 3] node log scale -> scales [M, 3], quats [M, 4]."""
        return self.finish(self.net(torch.cat([volume_feat, view_feat], dim=-1)), base_log_scale)

    def finish(self, out: torch.Tensor, base_log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The net's raw [M, 7] output and [M, 3] node log scale -> scales [M, 3], quats [M, 4]."""
        # Bounded residual: an unbounded exp() blows single Gaussians up to cover the image.
        log_scale = base_log_scale + self.max_log_residual * torch.tanh(out[:, :3] / self.max_log_residual)
        # Bias towards identity so near-zero outputs don't normalise to arbitrary rotations.
        quats = out[:, 3:] + self.identity.to(out.dtype)
        return log_scale.exp(), quats / quats.norm(dim=-1, keepdim=True).clamp(min=1e-8)


class OpacityHead(nn.Module):
    """Opacity [M] in (0, 1) from volume feature and target view."""

    def __init__(self, volume_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = mlp(volume_dim + VIEW_FEATURE_DIM, hidden, 1, num_layers=2)

    def forward(self, volume_feat: torch.Tensor, view_feat: torch.Tensor) -> torch.Tensor:
        return self.finish(self.net(torch.cat([volume_feat, view_feat], dim=-1)))

    @staticmethod
    def finish(out: torch.Tensor) -> torch.Tensor:
        """The net's raw [M, 1] output -> opacity [M]."""
        return torch.sigmoid(out)[:, 0]


class OffsetHead(nn.Module):
    """Position offset [M, 3] (segment frame, metres) in ``(-offset_max, offset_max)``, from [M, C]."""

    def __init__(self, volume_dim: int, hidden: int = 64, offset_max: float = 0.1) -> None:
        super().__init__()
        self.offset_max = offset_max
        self.net = mlp(volume_dim, hidden, 3, num_layers=2)

    def forward(self, volume_feat: torch.Tensor) -> torch.Tensor:
        return self.offset_max * torch.tanh(self.net(volume_feat))


def side_by_side(nets: tuple[nn.Sequential, ...]) -> bool:
    """Whether ``nets`` are two-layer MLPs (Linear, activation, Linear) with one input width and one
    activation type, so :func:`mlps_side_by_side` can evaluate them as one."""
    for net in nets:
        if len(net) != 3 or not isinstance(net[0], nn.Linear) or not isinstance(net[2], nn.Linear):
            return False
    first = nets[0]
    return all(net[0].in_features == first[0].in_features and type(net[1]) is type(first[1]) for net in nets)


def mlps_side_by_side(x: torch.Tensor, nets: tuple[nn.Sequential, ...]) -> list[torch.Tensor]:
    """``[net(x) for net in nets]`` as one MLP: the first layers' weights stacked ([sum H, D]), the
    second layers' block-diagonal ([sum O, sum H]); two GEMMs instead of two per net. The
    parameters stay the nets' own (their gradients arrive through the stacking).

    Args:
        x: [M, D] input of every net; nets: two-layer MLPs (:func:`side_by_side`).
    Returns:
        each net's [M, O_i] output.
    """
    hidden = F.linear(x, torch.cat([n[0].weight for n in nets]), torch.cat([n[0].bias for n in nets]))
    hidden = nets[0][1](hidden)  # the shared activation, elementwise
    out = F.linear(hidden, torch.block_diag(*(n[2].weight for n in nets)), torch.cat([n[2].bias for n in nets]))
    return list(out.split([n[2].out_features for n in nets], dim=-1))


class ViewDecoder(nn.Module):
    """The view-dependent heads of one target as one tensors-in, tensors-out module (the unit a
    training CUDA graph captures: ``make_graphed_callables`` takes a module's parameters as the
    graph's weights). Holds the predictor's own heads (no parameters of its own).

    ``means`` [M, 3] (segment frame, detached: the geometry heads must not move Gaussians through
    the view-direction input), ``target_c2w`` [4, 4] OpenCV camera-to-segment, ``target_K`` [3, 3]
    (or [M, 4, 4] and [M, 3, 3]: a target per row, :func:`view_features`);
    per-row inputs as the heads take them. Returns SH [M, bases, 3], scales [M, 3], quats [M, 4],
    opacities [M].
    """

    def __init__(self, color: ColorHead, scale_rotation: ScaleRotationHead, opacity: OpacityHead) -> None:
        super().__init__()
        self.color, self.scale_rotation, self.opacity = color, scale_rotation, opacity
        self._side_by_side = side_by_side((scale_rotation.net, opacity.net))  # fixed at construction

    def forward(self, image_feat: torch.Tensor, volume_feat: torch.Tensor, means: torch.Tensor,
                target_c2w: torch.Tensor, target_K: torch.Tensor, anchor_dc: torch.Tensor,
                base_log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        view_feat = view_features(means, target_c2w, target_K)
        sh = self.color(image_feat, volume_feat, view_feat, anchor_dc)
        if not self._side_by_side:
            scales, quats = self.scale_rotation(volume_feat, view_feat, base_log_scale)
            return sh, scales, quats, self.opacity(volume_feat, view_feat)
        # The geometry heads read the same rows: one input and one wider MLP, so at 1M rows a
        # second [M, C+5] concatenation (and its backward) and two of four small GEMMs go.
        sr_out, opacity_out = mlps_side_by_side(torch.cat([volume_feat, view_feat], dim=-1),
                                                (self.scale_rotation.net, self.opacity.net))
        scales, quats = self.scale_rotation.finish(sr_out, base_log_scale)
        return sh, scales, quats, self.opacity.finish(opacity_out)


def bucket_rows(rows: int, steps_per_octave: int = 4) -> int:
    """The smallest size of the form ``j * 2^k`` with ``steps_per_octave <= j < 2 * steps_per_octave``
    that holds ``rows`` (so at most ``1 / steps_per_octave`` of it is padding): the few fixed shapes
    that padded per-target row counts fall on, one CUDA graph each."""
    if rows <= steps_per_octave:
        return max(rows, 1)
    step = 1 << (rows.bit_length() - steps_per_octave.bit_length())
    return -(-rows // step) * step
