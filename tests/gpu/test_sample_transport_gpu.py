"""Training samples' uint8 images on their way to CUDA (``data/types.py`` ``Views.to``): pinned,
copied without blocking and turned into float32 there, equal to the host's float32 images."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.data.types import Views

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _views(images: torch.Tensor) -> Views:
    V = images.shape[0]
    return Views(images=images, intrinsics=torch.eye(3).expand(V, 3, 3).contiguous(),
                 camtoworlds=torch.eye(4).expand(V, 4, 4).contiguous(), frame_ids=torch.arange(V),
                 cam_ids=torch.zeros(V, dtype=torch.long))


def test_pinned_uint8_views_arrive_as_the_host_float_images_without_a_sync():
    decoded = torch.randint(0, 256, (7, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    host_float = _views(decoded).to("cpu").images  # the float32 route's images
    pinned = _views(decoded).pin_memory()
    assert pinned.images.is_pinned() and pinned.images.dtype == torch.uint8
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a pinned non-blocking copy and the conversion never sync
    try:
        moved = pinned.to("cuda", non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.images.dtype == torch.float32 and moved.images.is_cuda
    assert torch.equal(moved.images.cpu(), host_float)
