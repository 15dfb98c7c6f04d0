"""Replaying no-grad GPU work from captured CUDA graphs: one launch instead of hundreds.

A render of one camera re-runs the same few hundred small kernels (gathers, three MLP heads, the
sky warp) on tensors whose shapes only depend on the encoded state and the image size, not on the
camera pose. On a GPU each launch costs the host ~5-10 us, far more than these kernels take, so a
frame is bound by the launches. :class:`CapturedCall` records such a function once into a
``torch.cuda.CUDAGraph`` and replays it with new inputs copied into its static ones.

Rules a captured function must keep (checked by ``tests/gpu/test_cuda_graphs_gpu.py``): no host
sync, no host-to-device copy and no shape that depends on the inputs' values; everything it reads
besides its inputs (weights, cached state) stays at the same address. Outputs are the graph's own
static tensors: each call overwrites the previous call's outputs, so a caller consumes them before
calling again (a render rasterises them at once).

Captures run in CUDA's ``thread_local`` capture mode: the default ``global`` mode lets a CUDA call
from any other thread (the prefetcher pinning the next sample, nerfstudio's viewer thread) break a
capture, which then fails with "operation failed due to a previous error during capture".
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
import warnings
import weakref
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
from torch.autograd.graph import increment_version

WARMUP_RUNS = 2
"""Eager runs on a side stream before capture (PyTorch's rule: lazy initialisation, e.g. cuBLAS
workspaces, must not happen inside a capture)."""


CAPTURE_MODE = "thread_local"
"""cudaStreamCaptureMode of every capture here: only the capturing thread is restricted, other
threads' CUDA calls run as usual and stay out of the graph."""


CAPTURE_LOCK = threading.RLock()
"""Held by every capture here, warm-up included: one capture at a time in the process (CUDA's and
torch's rule; ``torch.cuda.graph`` captures on one shared side stream), whichever thread starts it
(nerfstudio's viewer thread and the training loop both capture)."""


@contextmanager
def _graphed_callables_capture_mode() -> Iterator[dict]:
    """The keyword arguments that make ``torch.cuda.make_graphed_callables`` capture in
    :data:`CAPTURE_MODE`, under :data:`CAPTURE_LOCK`. Torch releases whose
    ``make_graphed_callables`` takes no ``capture_error_mode`` (2.13 and before) capture through
    ``torch.cuda.graph``; for those the name is bound to one with the mode preset for the duration
    (the lock keeps two threads from binding and restoring it out of order)."""
    with CAPTURE_LOCK:
        if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
            yield {"capture_error_mode": CAPTURE_MODE}
            return
        original = torch.cuda.graph
        torch.cuda.graph = functools.partial(original, capture_error_mode=CAPTURE_MODE)
        try:
            yield {}
        finally:
            torch.cuda.graph = original


def _copy_into(static: Any, value: Any) -> None:
    """Copy the tensors of ``value`` into the same-shaped tensors of ``static`` (tuples/lists nest)."""
    if isinstance(static, torch.Tensor):
        static.copy_(value, non_blocking=True)
    elif isinstance(static, (tuple, list)):
        for s, v in zip(static, value):
            _copy_into(s, v)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` (tuples/lists nest)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _static_copy(value: Any, device: torch.device) -> Any:
    """A device copy of every tensor in ``value`` (tuples/lists nest); other values are kept."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_static_copy(v, device) for v in value)
    return value


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s in-place write counter, None for tensors without one (inference-mode tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


class InputMemo:
    """Which of a call's inputs are the very tensors seen last time, unmodified since.

    A replay copies its inputs into the graph's static tensors; a viewer moving its camera passes
    the same encoded-state tensors every frame (the sources' images, 30 MB at 960x640, the rows the
    heads read), so only the camera is new. "The same" is decided on the host: the same object (a
    weak reference, so a freed tensor's id reused by another never matches) at the same
    ``_version`` (bumped by every in-place write, under ``no_grad`` too, and by
    :class:`CapturedCall` on its outputs after each replay). Nested tuples and non-tensors always
    count as changed.
    """

    def __init__(self, size: int) -> None:
        self._seen: list[Optional[tuple[weakref.ref, int]]] = [None] * size

    def changed(self, i: int, value: Any) -> bool:
        """Whether input ``i`` must be copied; remembers ``value`` as input ``i``'s last value."""
        version = _version(value) if isinstance(value, torch.Tensor) else None
        seen = self._seen[i]
        same = seen is not None and version is not None and seen[0]() is value and seen[1] == version
        self._seen[i] = (weakref.ref(value), version) if version is not None else None
        return not same


class CapturedCall:
    """``fn(*inputs)`` captured into a CUDA graph; calling it replays the graph on new inputs.

    Inputs that are the same unmodified tensors as at the previous call are not copied again
    (:class:`InputMemo`).

    Args:
        fn: the function to capture (see the module doc for what it may do).
        inputs: example inputs (tensors, or tuples of them, on any device); their shapes and
            dtypes are fixed for the graph's lifetime.
        device: the CUDA device to capture on.
    """

    def __init__(self, fn: Callable[..., Any], inputs: tuple, device: torch.device) -> None:
        self.inputs = _static_copy(inputs, device)
        self._memo = InputMemo(len(inputs))
        for i, value in enumerate(inputs):
            self._memo.changed(i, value)
        with CAPTURE_LOCK:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    fn(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
                self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Any) -> Any:
        """Replay on ``inputs`` (same shapes as at capture); returns the static outputs."""
        for i, (static, value) in enumerate(zip(self.inputs, inputs)):
            if self._memo.changed(i, value):
                _copy_into(static, value)
        self.graph.replay()
        # A replay rewrites the outputs without autograd's version counter seeing it; bumped here,
        # so a graph reading them as inputs (their InputMemo) copies the new values in.
        for t in _tensors(self.outputs):
            increment_version(t)
        return self.outputs


class CapturedGradCall:
    """``fn(*inputs)`` and its backward captured into CUDA graphs (``torch.cuda.make_graphed_callables``).

    Calling it returns outputs that autograd back-propagates through the captured backward. The
    graphs' saved tensors are static: each output must be back-propagated (or dropped) before the
    next call, as a per-target backward does. Inputs keep the ``requires_grad`` of the examples.

    ``fn`` may be an ``nn.Module``: its parameters are the graphs' weights (updated in place by the
    optimizer, so the graphs see every step's values) and receive their gradients.
    """

    def __init__(self, fn: Callable[..., Any], inputs: tuple, device: torch.device) -> None:
        examples = tuple(t.detach().to(device).clone().requires_grad_(t.requires_grad) for t in inputs)
        if isinstance(fn, torch.nn.Module):
            # make_graphed_callables replaces the module's forward by the graph's: a shallow copy
            # (same submodules and parameters) takes it, so the module itself stays eager.
            fn = copy.copy(fn)
        self.params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []
        with _graphed_callables_capture_mode() as mode:
            self.call = torch.cuda.make_graphed_callables(fn, examples, num_warmup_iters=WARMUP_RUNS + 1, **mode)

    def __call__(self, *inputs: Any) -> Any:
        # The captured backward hands out its static gradient buffers, and autograd adopts an
        # incoming gradient as a parameter's .grad when it has none: the next replay would then
        # overwrite that .grad. With a .grad in place autograd adds into it instead.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return self.call(*inputs)


class GraphCache:
    """Captured calls by key, captured on the ``capture_after``-th call of a key (one-off renders
    stay eager: a capture costs a few eager runs), at most ``capacity`` kept (least recently used
    dropped: each graph holds its own memory pool). A capture that fails warns once and turns the
    cache off (every later call runs eagerly), so an op that cannot be captured never breaks a render.
    ``grad``: capture forward and backward (:class:`CapturedGradCall`), else forward only.
    """

    def __init__(self, capacity: int = 2, capture_after: int = 2, grad: bool = False) -> None:
        if capacity < 1 or capture_after < 1:
            raise ValueError(f"GraphCache needs capacity >= 1 and capture_after >= 1, got {capacity}, {capture_after}")
        self.capacity, self.capture_after, self.grad = capacity, capture_after, grad
        self._graphs: OrderedDict[Hashable, CapturedCall] = OrderedDict()
        self._calls: Counter = Counter()
        self.disabled: Optional[str] = None
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, fn: Callable[..., Any], inputs: tuple, device: torch.device) -> Any:
        """``fn(*inputs)``, from the graph captured under ``key`` when there is one."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            self.replays += 1
            return graph(*inputs)
        self._calls[key] += 1
        if self.disabled is not None or self._calls[key] < self.capture_after:
            return fn(*inputs)
        try:
            graph = (CapturedGradCall if self.grad else CapturedCall)(fn, inputs, device)
        except (RuntimeError, AssertionError) as err:  # an op that syncs or copies from the host, autocast caching
            self.disabled = str(err)
            warnings.warn(f"CUDA-graph capture failed, rendering eagerly from now on: {err}")
            return fn(*inputs)
        self._graphs[key] = graph
        if len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return graph(*inputs)

    def clear(self) -> None:
        self._graphs.clear()
        self._calls.clear()
