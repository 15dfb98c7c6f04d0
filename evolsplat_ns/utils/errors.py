"""Errors the user fixes (bad data, settings, files) and how every command reports them.

A :class:`UserError`'s message is complete by itself: it names the file or setting, the problem
and the fix. Commands print it as one line and exit non-zero; a traceback would only bury it.
``EVOLSPLAT_DEBUG=1`` shows the traceback anyway (for bug reports and debugging).

nerfstudio's own entry points (``ns-train``, ``ns-eval``, ``ns-viewer``, ``ns-export``) get the
same treatment through :func:`install_excepthook`, which :mod:`evolsplat_ns.method_configs`
installs when nerfstudio loads our method registrations: only :class:`UserError` is shortened,
every other exception keeps Python's full traceback.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Callable, NoReturn, Optional, TypeVar

DEBUG_ENV = "EVOLSPLAT_DEBUG"
"""Set to 1 to see the traceback of user errors too."""

T = TypeVar("T")


class UserError(Exception):
    """An error in the user's data, settings or files; the message says what to fix."""


class ConfigError(UserError, ValueError):
    """A setting (config field or command-line flag) that cannot work; names the setting and fix."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def format_user_error(prog: str, err: BaseException) -> str:
    """``prog: error: message`` plus the hint for the traceback (one line, then the hint)."""
    return f"{prog}: error: {err}\n({DEBUG_ENV}=1 shows the traceback)"


def exit_on_user_error(prog: str, fn: Callable[[], T], code: int = 2,
                       also: tuple[type[BaseException], ...] = ()) -> T:
    """``fn()``; a UserError (or one of ``also``) is printed without traceback, then exit ``code``."""
    try:
        return fn()
    except (UserError, *also) as e:
        if debug_enabled():
            raise
        _fail(prog, e, code)


def _fail(prog: str, err: BaseException, code: int) -> NoReturn:
    print(format_user_error(prog, err), file=sys.stderr)
    sys.exit(code)


def install_excepthook(prog: Optional[str] = None) -> None:
    """Make an uncaught UserError end the process with its message, no traceback (idempotent).

    Anything else goes to the previous hook unchanged. The process exit status of an uncaught
    exception is 1 either way.
    """
    previous = sys.excepthook
    if getattr(previous, "_evolsplat", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
        if isinstance(value, UserError) and not debug_enabled():
            name = prog or os.path.basename(sys.argv[0] or "evolsplat")
            print(format_user_error(name, value), file=sys.stderr)
            return
        previous(kind, value, tb)

    hook._evolsplat = True  # type: ignore[attr-defined]
    sys.excepthook = hook
