"""Prefetch the next training sample in a background thread, keeping runs exactly resumable.

Decoding a step's JPEGs (7 images at 960x640 take ~50 ms) would otherwise stall the GPU every
iteration; PIL and numpy release the GIL, so a worker thread overlaps it with the training step.

Resume stays exact: samples are drawn strictly in order by one worker, and :meth:`state_dict`
returns the data-stream state captured *before* the pending (not yet consumed) sample was drawn,
so a run restored from it draws that same sample next.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Calls ``produce()`` one step ahead; ``get_state``/``set_state`` save and restore its stream.

    With ``enabled=False`` it is a plain pass-through (same results, no thread).
    """

    def __init__(self, produce: Callable[[], T], get_state: Callable[[], dict],
                 set_state: Callable[[dict], None], enabled: bool = True):
        self._produce, self._get_state, self._set_state = produce, get_state, set_state
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-prefetch") if enabled else None
        self._pending: Optional[tuple[dict, Future]] = None

    def next(self) -> T:
        if self._pool is None:
            return self._produce()
        if self._pending is None:
            self._submit()
        _, fut = self._pending
        item = fut.result()  # re-raises a worker error here, in the training loop
        self._submit()
        return item

    def _submit(self) -> None:
        # Called only when no draw is running, so the captured state is consistent.
        self._pending = (self._get_state(), self._pool.submit(self._produce))

    def state_dict(self) -> dict:
        """The stream state from which the next ``next()`` result is drawn."""
        return self._pending[0] if self._pending is not None else self._get_state()

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self._set_state(state)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            try:
                self._pending[1].result()
            except Exception:  # noqa: BLE001 - a discarded draw's error does not matter
                pass
            self._pending = None

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
