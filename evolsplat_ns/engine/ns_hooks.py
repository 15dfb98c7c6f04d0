"""Guards where EVolSplat meets nerfstudio's own scripts (``ns-eval``, ``ns-viewer``, ``ns-export``).

Those scripts load a run through ``nerfstudio.utils.eval_utils.eval_setup``, which builds the
pipeline (ours) and then calls ``eval_load_checkpoint``: the highest-numbered file of the
checkpoint folder, with a bare ``EOFError`` when it is truncated and ``invalid literal for int()``
when any other file sits there. ``ns-export gaussian-splat`` then writes ``splat.ply`` over
whatever is there. nerfstudio has no plugin hook for either, so :func:`install` (called when an
EVolSplat pipeline is built, i.e. after those modules are fully imported and before the checkpoint
is read or the file written) wraps the two functions:

- ``eval_load_checkpoint``: for an EVolSplat pipeline, the newest intact checkpoint is loaded
  (broken ones named and skipped, see :mod:`evolsplat_ns.engine.checkpoints`); other pipelines
  get nerfstudio's function unchanged.
- ``ExportGaussianSplat.write_ply``: refuses to replace an existing file unless
  ``EVOLSPLAT_OVERWRITE=1`` (ns-export has no flag we could add), and writes through a temp file
  so an interrupted export leaves no partial PLY.

Only modules already imported are touched: nothing here imports nerfstudio's scripts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from evolsplat_ns.engine import checkpoints
from evolsplat_ns.utils.errors import UserError

OVERWRITE_ENV = "EVOLSPLAT_OVERWRITE"


class ExportExistsError(UserError, FileExistsError):
    """An export would replace an existing file."""


_PIPELINE_TYPES: tuple[type, ...] = ()
"""Pipelines whose checkpoints load through :func:`_eval_load_checkpoint` (set by :func:`install`)."""


def install(pipeline_type: type) -> None:
    """Wrap the nerfstudio functions described above for pipelines of ``pipeline_type``
    (idempotent; only modules already loaded)."""
    global _PIPELINE_TYPES
    if pipeline_type not in _PIPELINE_TYPES:
        _PIPELINE_TYPES = (*_PIPELINE_TYPES, pipeline_type)
    eval_utils = sys.modules.get("nerfstudio.utils.eval_utils")
    if eval_utils is not None and hasattr(eval_utils, "eval_load_checkpoint"):
        eval_utils.eval_load_checkpoint = _wrap_once(eval_utils.eval_load_checkpoint, _eval_load_checkpoint)
    exporter = sys.modules.get("nerfstudio.scripts.exporter")
    cls = getattr(exporter, "ExportGaussianSplat", None)
    if cls is not None:
        cls.write_ply = staticmethod(_wrap_once(cls.write_ply, _write_ply_no_overwrite))


def _wrap_once(original: Callable, wrapper: Callable) -> Callable:
    if getattr(original, "_evolsplat_original", None) is not None:
        return original

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    wrapped._evolsplat_original = original  # type: ignore[attr-defined]
    wrapped.__doc__ = original.__doc__
    return wrapped


def _eval_load_checkpoint(original: Callable, config, pipeline) -> tuple[Path, int]:
    if not isinstance(pipeline, _PIPELINE_TYPES):
        return original(config, pipeline)
    if config.load_step is not None:
        path = Path(config.load_dir) / checkpoints.checkpoint_name(config.load_step)
        state = checkpoints.load_checkpoint(path)
    else:
        path, state = checkpoints.newest_loadable_checkpoint(Path(config.load_dir))
    pipeline.load_pipeline(state["pipeline"], state["step"])
    print(f"Done loading checkpoint from {path}", flush=True)
    return path, state["step"]


def _write_ply_no_overwrite(original: Callable, filename: str, *args: Any, **kwargs: Any) -> None:
    path = Path(filename)
    if path.exists() and os.environ.get(OVERWRITE_ENV, "") != "1":
        raise ExportExistsError(f"refusing to replace existing {path}: pass --output-filename NEW.ply or "
                                f"another --output-dir, or set {OVERWRITE_ENV}=1 (the --overwrite of ns-export)")
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        original(str(tmp), *args, **kwargs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
