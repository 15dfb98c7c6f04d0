"""Make the registry's CUDA-built torchvision importable on a CPU-only torch.

The torchvision wheel on the package registry is compiled against libtorch_cuda. On a CPU torch
its ``_C`` extension cannot load, and ``torchvision/_meta_registrations.py`` then fails with
``RuntimeError: operator torchvision::nms does not exist`` because it registers fake kernels for
ops whose schemas were never defined. We define those schemas (no kernels) before torchvision is
imported, so the pure-PyTorch parts (models, transforms, RAFT) work; calling a compiled op such as
``torchvision.ops.nms`` still raises a clear "no kernel" error.

``install()`` is run from a ``.pth`` file that ``scripts/setup.sh`` writes into CPU venvs only. It
adds a meta-path hook, so torch is imported only when something imports torchvision.
"""

from __future__ import annotations

import importlib.abc
import sys

# Schemas copied from torchvision/csrc/ops/*.cpp (TORCH_LIBRARY_FRAGMENT(torchvision, m)).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward": "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool": "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward": "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float "
    "spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_align": "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt "
    "pooled_height, SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward": "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor "
    "channel_mapping, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int "
    "sampling_ratio, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool": "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt "
    "pooled_height, SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward": "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor "
    "channel_mapping, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt "
    "batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d": "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt "
    "dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward": "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, "
    "Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, "
    "SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
    "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
_LIB = None


def define_missing_schemas() -> None:
    """Define torchvision op schemas that a failed ``_C`` load left undefined (CPU torch only)."""
    global _LIB
    import torch

    if torch.version.cuda is not None or _LIB is not None:
        return
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            _LIB.define(schema)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_schemas()
        return None


def install() -> None:
    """Arrange for :func:`define_missing_schemas` to run just before torchvision is imported."""
    if "torchvision" not in sys.modules and not any(isinstance(h, _Hook) for h in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
