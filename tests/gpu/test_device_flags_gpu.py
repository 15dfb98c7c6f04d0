"""FiniteFlags on CUDA: the read waits for the noted losses, not for the work queued after them."""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.utils.device_flags import FiniteFlags

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_the_cuda_read_waits_for_the_noted_losses_only():
    flags = FiniteFlags()
    x = torch.ones(1 << 20, device="cuda")
    flags.note((x * 2).sum())
    flags.note((x / 0).sum())  # inf
    torch.cuda._sleep(1 << 30)  # ~0.5 s of device work queued after the last note (a backward's stand-in)
    assert not flags.all_finite()
    assert not torch.cuda.current_stream().query(), "the read waited for the work after the last note"
    torch.cuda.synchronize()
