"""Process set-up shared by our entry points (our CLIs and the plugin load of every ``ns-*`` tool).

- ``ffmpeg`` on PATH: nerfstudio's ``ns-render`` checks ``shutil.which("ffmpeg")`` and mediapy
  runs it; the venv ships imageio-ffmpeg's binary, which ``scripts/setup.sh`` links as
  ``.venv/bin/ffmpeg``. A venv's ``bin`` is not on PATH unless activated, so it is added here;
  without that link (a plain ``pip install``) the binary is linked as ``ffmpeg`` in a cache folder.
- Third-party warnings we cannot fix (deprecations inside nerfstudio and torch) are filtered by
  message and module, so our own warnings (skipped steps, empty segments) stay visible.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

_THIRD_PARTY_WARNINGS = [
    # nerfstudio 1.1.5 decorates with torch.cuda.amp.custom_fwd/bwd (deprecated in torch 2.4).
    dict(message=r".*torch\.cuda\.amp\.custom_(fwd|bwd).*", category=FutureWarning),
    dict(message=r".*torch\.cuda\.amp\.GradScaler.*", category=FutureWarning),
    # torch.load's weights_only default change, raised by nerfstudio's checkpoint loading.
    dict(message=r".*weights_only=False.*", category=FutureWarning),
]

_FX_TRACING_NOTE = "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"
"""Logged (not warned) by torch.fx when spconv asks ``is_fx_tracing()`` in every sparse conv."""


class _DropFxTracingNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _FX_TRACING_NOTE not in record.getMessage()


def filter_third_party_warnings() -> None:
    """Silence the known third-party warnings listed above (nothing of ours)."""
    for spec in _THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", **spec)
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    if not any(isinstance(f, _DropFxTracingNote) for f in fx_log.filters):
        fx_log.addFilter(_DropFxTracingNote())


def ensure_ffmpeg_on_path() -> str | None:
    """Path of an ``ffmpeg`` executable, putting the venv's ``bin`` (where set-up links
    imageio-ffmpeg's binary) on PATH when ffmpeg is not already there; None if none exists."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    folder = Path(sys.executable).parent
    if not (folder / "ffmpeg").exists():
        folder = _linked_imageio_ffmpeg()
        if folder is None:
            return None
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return shutil.which("ffmpeg")


def _linked_imageio_ffmpeg() -> Path | None:
    """A folder holding ``ffmpeg`` -> imageio-ffmpeg's binary (None without imageio-ffmpeg)."""
    try:
        import imageio_ffmpeg

        exe = Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return None
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evolsplat-ns" / "bin"
    link = folder / "ffmpeg"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if link.resolve() != exe.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(exe)
    except OSError:
        return None
    return folder


def prepare_process() -> None:
    """Everything above; idempotent and cheap (no heavy import)."""
    filter_third_party_warnings()
    ensure_ffmpeg_on_path()
