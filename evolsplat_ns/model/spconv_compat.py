"""Workarounds that make spconv's CPU build usable for training on CPU (no-ops for CUDA tensors).

Two defects of the CPU-only ``spconv`` 2.3.x build (measured, see shared/ENVIRONMENT.md):

1. **Backward crashes**: ``spconv.pytorch.ops.indice_conv_backward`` calls ``get_current_stream()``
   unconditionally, which asks ``torch.cuda`` for a stream and raises
   ``AssertionError: Torch not compiled with CUDA enabled``. The forward path already uses
   ``stream = 0`` for CPU tensors; the backward simply forgot the guard. On CPU the stream argument
   is ignored by the kernels, so returning 0 there is exactly what the forward does.
2. **Wrong results with several torch threads**: the CPU gather/scatter-add kernels race when torch
   runs multi-threaded (tens of wrong voxels of 40k, different every run). One thread is correct.

3. **CUDA builds on CPU tensors** (``spconv-cu12x`` on a GPU workstation running a CPU test):
   their layers default to implicit-GEMM kernels, which exist only for CUDA ("implicit gemm only
   support cuda"); the native algorithm runs on both.

Fix: :func:`cpu_spconv_context` runs a block with one torch thread and a CPU-safe stream getter in
``spconv.pytorch.ops``; :func:`install_cpu_backward_guard` wraps ``ops.indice_conv_backward`` once so
that every spconv backward on CPU tensors runs inside that context too (autograd calls it long after
the forward's ``with`` block has exited). CUDA tensors pass straight through to the original code.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

try:
    from spconv.core import ConvAlgo
except ImportError as e:  # spconv comes through an extra, one build per machine
    raise ImportError(
        "spconv is not installed. Install the build for this machine through its extra: "
        "pip install -e '.[cpu]' (CPU) or '.[cu126]' / '.[cu124]' / '.[cu121]' (CUDA 12.6+ / 12.4-12.5 / "
        "older); bash scripts/setup.sh picks it for you") from e
from spconv.pytorch import ops as spconv_ops
from spconv.pytorch.conv import SparseConvolution

_GUARD_ATTR = "_evolsplat_cpu_guard"


def _cpu_stream() -> int:
    # The CPU kernels ignore the stream; 0 is the value spconv's own CPU forward passes.
    return 0


@contextmanager
def cpu_spconv_context() -> Iterator[None]:
    """Run spconv CPU ops single-threaded with a stream getter that does not touch CUDA.

    Restores the previous torch thread count and spconv's stream getter on exit. Only enter it for
    CPU tensors: inside it, spconv would pass stream 0 to CUDA kernels too.
    """
    threads = torch.get_num_threads()
    getter = spconv_ops.get_current_stream
    torch.set_num_threads(1)
    spconv_ops.get_current_stream = _cpu_stream
    try:
        yield
    finally:
        spconv_ops.get_current_stream = getter
        torch.set_num_threads(threads)


def _guarded_backward(original: Callable) -> Callable:
    @functools.wraps(original)
    def backward(features: torch.Tensor, *args, **kwargs):
        if features.is_cuda:
            return original(features, *args, **kwargs)
        with cpu_spconv_context():
            return original(features, *args, **kwargs)

    setattr(backward, _GUARD_ATTR, True)
    return backward


def install_cpu_backward_guard() -> None:
    """Wrap ``spconv.pytorch.ops.indice_conv_backward`` (idempotent) so CPU backward works.

    ``spconv.pytorch.functional``'s autograd Functions look the op up as ``ops.indice_conv_backward``
    at call time, so replacing the module attribute reaches every SubM/Sparse/Inverse conv layer.
    """
    current = spconv_ops.indice_conv_backward
    if not getattr(current, _GUARD_ATTR, False):
        spconv_ops.indice_conv_backward = _guarded_backward(current)


@contextmanager
def native_algorithm(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module``'s sparse convolutions with spconv's native algorithm (defect 3) in this block."""
    convs = [m for m in module.modules() if isinstance(m, SparseConvolution)]
    saved = [m.algo for m in convs]
    for m in convs:
        m.algo = ConvAlgo.Native
    try:
        yield
    finally:
        for m, algo in zip(convs, saved):
            m.algo = algo


@contextmanager
def spconv_device_guard(device: torch.device, module: torch.nn.Module | None = None) -> Iterator[None]:
    """Context for a block of spconv calls on ``device`` (of ``module``'s layers, if given): the CPU
    workarounds on CPU, nothing on CUDA."""
    if device.type == "cuda":
        yield
        return
    install_cpu_backward_guard()
    with cpu_spconv_context():
        if module is None:
            yield
        else:
            with native_algorithm(module):
                yield
