"""Crash-safe checkpoints: atomic writes, verified before older ones go, newest intact one found.

nerfstudio writes ``torch.save`` straight to ``step-N.ckpt`` and then deletes the others, so a
``kill -9`` or a full disk during a save leaves a truncated newest file and, with
``save_only_latest_checkpoint``, nothing intact. Here a save:

1. serialises the state in memory (so a write error is the OS's ``errno``, not torch's zip
   writer's "unexpected pos"),
2. writes it to a hidden temp file in the same folder, flushes and ``fsync``s it,
3. ``os.replace``s it onto ``step-N.ckpt`` (atomic on POSIX) and syncs the folder,
4. loads the new file back, and only then deletes older ``step-*.ckpt`` files.

A reader takes the newest ``step-*.ckpt`` that loads and names every one it skips; other files
in the folder (``README.txt``, temp files of an interrupted save) are ignored.
"""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from evolsplat_ns.utils.errors import UserError

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.ckpt$")
TEMP_PREFIX = ".tmp-"
REQUIRED_KEYS = ("step", "pipeline")

_WRITTEN_HERE: set[Path] = set()
"""Checkpoint folders this process has saved into (its own run; see :func:`written_by_this_process`)."""

_CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written; the message names the file and the cause."""


def checkpoint_name(step: int) -> str:
    """``step-000000042.ckpt``: nerfstudio's zero-padded name (name order is step order)."""
    return f"step-{step:09d}.ckpt"


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-*.ckpt`` in ``checkpoint_dir``, oldest first (others ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), checkpoint_dir / name) for name in os.listdir(checkpoint_dir)
             if (m := CHECKPOINT_RE.match(name)) and (checkpoint_dir / name).is_file()]
    return sorted(found)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in ``path`` (on CPU); CheckpointError naming the file if it does not load."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated zips, pickles and OS errors all mean "broken"
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"{path}: broken checkpoint ({size} bytes; {type(e).__name__}: {e}); "
                              "an interrupted save or a full disk?") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
    return state


def newest_loadable_checkpoint(checkpoint_dir: Path, warn: Optional[Callable[[str], None]] = None
                               ) -> tuple[Path, dict[str, Any]]:
    """The newest ``step-*.ckpt`` of ``checkpoint_dir`` that loads, and its state.

    Broken newer files are skipped, each named through ``warn`` (default: print). Raises
    CheckpointError when there is none, or when every one is broken (all named).
    """
    warn = warn or (lambda message: print(message, flush=True))
    checkpoint_dir = Path(checkpoint_dir)
    found = list_checkpoints(checkpoint_dir)
    if not found:
        raise CheckpointError(f"{checkpoint_dir}: no step-*.ckpt checkpoints (train first: ns-train saves "
                              "every steps_per_save steps)")
    skipped: list[str] = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            warn(f"skipping {e}")
            continue
        if skipped:
            warn(f"using the newest intact checkpoint {path}")
        return path, state
    raise CheckpointError(f"{checkpoint_dir}: no checkpoint loads: " + "; ".join(skipped))


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and force it to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (best effort: not every file system allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cause(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "")
    label = _CAUSES.get(err.errno or 0, err.strerror or str(err))
    return f"{label} ({name})" if name else label


def save_checkpoint(checkpoint_dir: Path, step: int, state: dict[str, Any], keep_only_latest: bool = True) -> Path:
    """Write ``state`` to ``checkpoint_dir/step-N.ckpt`` atomically; returns its path.

    With ``keep_only_latest``, older ``step-*.ckpt`` files are deleted once the new one has been
    read back successfully. On any failure the folder keeps what it held before (no partial file)
    and CheckpointError names the path and the cause (e.g. "disk full (ENOSPC)").
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / checkpoint_name(step)
    previous = [p for _, p in list_checkpoints(checkpoint_dir) if p != path]
    kept = f"; the previous checkpoint {previous[-1]} is kept" if previous else ""
    tmp = checkpoint_dir / f"{TEMP_PREFIX}{path.name}.{os.getpid()}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(checkpoint_dir)
        _write_durably(tmp, buffer.getbuffer())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise CheckpointError(f"cannot write checkpoint {path}: {_cause(e)}{kept}") from e
    finally:
        del buffer
    _sync_dir(checkpoint_dir)
    _WRITTEN_HERE.add(checkpoint_dir.resolve())
    load_checkpoint(path)  # raises (naming the file) before anything older is deleted
    if keep_only_latest:
        for old in previous:
            _unlink_quietly(old)
    return path


def written_by_this_process(checkpoint_dir: Path) -> bool:
    """Whether this process saved the checkpoints in ``checkpoint_dir`` (so they are its own run's)."""
    return Path(checkpoint_dir).resolve() in _WRITTEN_HERE


def _remove_stale_temp_files(checkpoint_dir: Path) -> None:
    """Temp files of saves that were killed mid-write (never a ``step-*.ckpt`` or a user's file)."""
    for name in os.listdir(checkpoint_dir):
        if name.startswith(TEMP_PREFIX) and ".ckpt." in name:
            _unlink_quietly(checkpoint_dir / name)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
