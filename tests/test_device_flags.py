"""FiniteFlags: the step's finiteness read (its CUDA side: tests/gpu/test_device_flags_gpu.py)."""

from __future__ import annotations

import torch

from evolsplat_ns.utils.device_flags import FiniteFlags


def test_flags_are_all_finite_until_a_nonfinite_loss_is_noted():
    flags = FiniteFlags()
    assert flags.all_finite() and len(flags) == 0
    flags.note(torch.tensor(0.25))
    flags.note(torch.tensor([1.0, 2.0]))
    assert flags.all_finite() and len(flags) == 2
    flags.note(torch.tensor([1.0, float("inf")]))
    flags.note(torch.tensor(0.5))
    assert not flags.all_finite()
    nan_only = FiniteFlags()
    nan_only.note(torch.tensor(float("nan"), requires_grad=True))
    assert not nan_only.all_finite()
