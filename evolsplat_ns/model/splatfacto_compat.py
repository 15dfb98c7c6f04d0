"""nerfstudio's Gaussian-splatting surface for EVolSplat (stock ``ns-export gaussian-splat``, viewer).

nerfstudio recognises a Gaussian-splatting model only by ``isinstance(model, SplatfactoModel)``:
``ns-export gaussian-splat`` asserts it, and the viewer uses it for its splat paths (background
colour, fast depth, the splat export panel, initial points). It has no plugin hook for this, so
:class:`SplatfactoSurface` derives from ``SplatfactoModel`` and turns off everything of splatfacto's
own optimisation (densification callbacks, its parameter groups, its resizing ``load_state_dict``).
What remains is the read-only attribute surface those tools use, served from the Gaussians the
feed-forward model predicts for the shown segment (the model's context) as seen from its reference
view: splatfacto's layout, positions in the segment frame (x forward, y left, z up, metres).
"""

from __future__ import annotations

from typing import Optional

import torch
from nerfstudio.models.splatfacto import SplatfactoModel
from torch import nn

from evolsplat_ns.model.node import GaussianParams
from evolsplat_ns.model.render.sh import sh0_to_rgb


class SplatfactoSurface(SplatfactoModel):
    """Splatfacto's attributes (``means``, ``scales`` (log), ``quats`` (wxyz), ``opacities``
    (logits [N, 1]), ``shs_0`` [N, 3], ``shs_rest`` [N, K-1, 3], ``colors``) for exporters."""

    def snapshot_gaussians(self) -> GaussianParams:
        """Gaussians of the shown segment (implemented by the model)."""
        raise NotImplementedError

    def get_training_callbacks(self, training_callback_attributes) -> list:
        """No splatfacto densification/refinement: EVolSplat predicts its Gaussians."""
        return []

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Plain ``nn.Module`` loading (splatfacto's version resizes its own Gaussian parameters)."""
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    @property
    def num_points(self) -> int:
        return len(self.snapshot_gaussians())

    @property
    def means(self) -> torch.Tensor:
        return self.snapshot_gaussians().means

    @property
    def scales(self) -> torch.Tensor:
        return self.snapshot_gaussians().scales.log()

    @property
    def quats(self) -> torch.Tensor:
        return self.snapshot_gaussians().quats

    @property
    def opacities(self) -> torch.Tensor:
        return torch.logit(self.snapshot_gaussians().opacities.clamp(1e-6, 1 - 1e-6))[:, None]

    @property
    def features_dc(self) -> torch.Tensor:
        return self.snapshot_gaussians().sh[:, 0, :]

    @property
    def features_rest(self) -> torch.Tensor:
        return self.snapshot_gaussians().sh[:, 1:, :]

    @property
    def shs_0(self) -> torch.Tensor:
        return self.features_dc

    @property
    def shs_rest(self) -> torch.Tensor:
        return self.features_rest

    @property
    def colors(self) -> torch.Tensor:
        return sh0_to_rgb(self.features_dc).clamp(0.0, 1.0)

    @property
    def background_color(self) -> Optional[torch.Tensor]:
        return getattr(self, "_viewer_background", None)

    @background_color.setter
    def background_color(self, value: torch.Tensor) -> None:
        # The viewer sets its background colour here; EVolSplat renders its own sky model instead.
        self._viewer_background = value
