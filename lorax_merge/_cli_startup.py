"""Ctrl-C while the ``lorax-merge`` command is still loading (importing torch takes seconds).

The package imports this module first. In a process started as the command (the
``lorax-merge`` script or ``python -m lorax_merge``) whose SIGINT handler is still Python's
default, Ctrl-C then ends the process with one "interrupted" line and exit code 130 instead of
a traceback of the import. ``lorax_merge.cli.main`` hands SIGINT back with :func:`release`.
SIGTERM is left alone: by default it ends the process quietly (exit status 143 in a shell).
Imported as a library, the package changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

_COMMAND = "lorax-merge"
_PACKAGE = "lorax_merge"


def _started_as_command() -> bool:
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script in (_COMMAND, f"{_COMMAND}.exe", f"{_COMMAND}-script.py"):
        return True
    # python -m lorax_merge: the interpreter's own options come before "-m".
    argv = list(getattr(sys, "orig_argv", []))[1:]
    for i, token in enumerate(argv):
        if token == "-m":
            return argv[i + 1 : i + 2] == [_PACKAGE]
        if token.startswith("-m"):
            return token[2:] == _PACKAGE
        if not token.startswith("-") or token in ("-", "-c"):
            return False
    return False


def _interrupted(signum: int, frame: Any) -> None:
    os.write(2, f"{_COMMAND}: error: interrupted\n".encode())
    os._exit(130)


def release() -> None:
    """Give SIGINT back to Python's default handler, if this module took it."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler and _started_as_command():
        signal.signal(signal.SIGINT, _interrupted)


_install()
