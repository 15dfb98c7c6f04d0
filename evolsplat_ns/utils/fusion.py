"""Fusing small pure-tensor functions with ``torch.compile``: a few kernels instead of tens.

The one draw's work before and after the rasteriser (``model/render/layers.py``: camera depths,
the dome moved behind the foreground, SH colours, the 9-channel features; the background's
normalisation and the sky blend) is ~40 elementwise ops forward and ~50 backward per camera. On a
GPU each is a launch plus an autograd node's host time, and the training step is bound by the host
(docs/performance.md). Compiled with inductor (Triton kernels on CUDA), each function becomes a
handful of fused kernels forward and one autograd node backward. Shapes are "automatically
dynamic": the first call compiles for its shapes, the first call with another row count compiles
once more with that size symbolic, and every later row count reuses it (``dynamic=True`` would make
the non-tensor arguments symbolic too, which e.g. ``pow``'s backward cannot take).

:class:`Fusable` holds the eager function and its compiled versions per backend and per value of
the function's non-tensor arguments (bound as constants, so they never become symbolic). A
function that cannot be compiled here (no Triton, no C compiler, an op dynamo cannot trace) warns
once, naming the cause and the setting that turns fusion off, and runs eagerly from then on: the
eager function is the reference the compiled one is tested against.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any, Callable, Hashable, Optional, Union

import torch

Backend = Union[str, Callable[..., Any]]
"""A ``torch.compile`` backend: its name or the backend callable."""
DISABLE_ENV = "EVOLSPLAT_NO_FUSION"
"""Set to 1 to run every :class:`Fusable` eagerly (what the model's ``fuse_draw False`` does)."""


def fusion_available(device: torch.device) -> bool:
    """Whether inductor can fuse on ``device`` here: a CUDA device with Triton installed, and not
    disabled through :data:`DISABLE_ENV` (on the CPU inductor would need a C++ toolchain and
    seconds of compilation per function for kernels that are not launch-bound)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


class Fusable:
    """``fn`` with optional ``torch.compile(fullgraph=True)`` versions.

    ``fn(*tensors, **static)``: ``tensors`` are tensors or tuples of them (or None), ``static`` are
    hashable non-tensor arguments (flags, degrees), fixed per compiled version.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: dict[tuple[Backend, Hashable], Callable[..., Any]] = {}
        self._failed: set[Backend] = set()

    def __call__(self, *tensors: Any, backend: Optional[Backend] = None, **static: Any) -> Any:
        """``fn(*tensors, **static)``, compiled with ``backend`` ("inductor"; "aot_eager" or a
        callable ``torch.compile`` backend to trace without generating kernels) or eager when
        ``backend`` is None or failed before."""
        if backend is None or backend in self._failed:
            return self.fn(*tensors, **static)
        key = (backend, tuple(sorted(static.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(backend, static)
        try:
            return compiled(*tensors)
        except Exception as error:  # noqa: BLE001 - see _is_compile_error
            if not _is_compile_error(error):
                raise
            self._failed.add(backend)
            warnings.warn(f"{self.fn.__module__}.{self.fn.__qualname__}: torch.compile ({backend}) failed, "
                          f"running eagerly ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                          f"set {DISABLE_ENV}=1 or pipeline.model.fuse_draw False to skip it", stacklevel=2)
            return self.fn(*tensors, **static)

    def _compile(self, backend: Backend, static: dict[str, Any]) -> Callable[..., Any]:
        fn = self.fn

        def bound(*tensors: Any) -> Any:
            return fn(*tensors, **static)

        bound.__name__ = bound.__qualname__ = fn.__name__
        # Inductor's C++ wrapper launches the kernels from C++: its Python wrapper cost more host
        # time per call than the eager ops it replaced (docs/performance.md, eleventh session).
        options = {"cpp_wrapper": True} if backend == "inductor" else None
        return torch.compile(bound, backend=backend, fullgraph=True, options=options)


def _is_compile_error(error: Exception) -> bool:
    """Errors of compilation itself (dynamo tracing, the backend's code generation, a missing
    toolchain), not of running the function: those propagate as they would eagerly."""
    from torch._dynamo import exc

    return isinstance(error, (exc.TorchDynamoException, ImportError, OSError)) or type(error).__module__.startswith(
        ("torch._inductor", "triton"))
