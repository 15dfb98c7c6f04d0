"""Where mixed precision applies inside the model, and where it must not.

Under the trainer's autocast (``use_mixed_precision``) only the MLP heads run in reduced
precision. Geometry stays fp32: pixel coordinates of a 960-pixel image in bf16 are off by up to
4 px, and SSIM's ``E[x^2] - E[x]^2`` cancels catastrophically below fp32. Rasterisation is fp32
as well (:meth:`EVolSplatModel.rasterize_gaussians`).

spconv casts its inputs to fp16 under any CUDA autocast (``custom_fwd(cast_inputs=float16)``),
whatever autocast's dtype. Its fp16 gradients are only safe behind a GradScaler, which the fp16
mode has and the bf16 mode does not; so :func:`sparse_conv_precision` lets the sparse U-Net run
under autocast only when autocast is fp16.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch


def full_precision(device: torch.device) -> ContextManager:
    """A block computed in fp32 even inside an autocast region (geometry, losses)."""
    return torch.autocast(device_type=device.type, enabled=False)


def allow_sparse_conv_tf32(allow: bool) -> None:
    """Whether spconv's fp32 implicit GEMMs may use TF32 tensor cores (process-wide: spconv reads
    ``spconv.constants.SPCONV_ALLOW_TF32`` at every call)."""
    from spconv import constants

    constants.SPCONV_ALLOW_TF32 = bool(allow)


def sparse_conv_precision(device: torch.device) -> ContextManager:
    """The sparse U-Net's precision: fp16 under fp16 autocast (loss-scaled), else fp32."""
    kind = device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
        return nullcontext()
    return full_precision(device)
