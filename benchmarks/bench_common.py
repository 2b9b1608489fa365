"""Pieces the benchmark scripts share: importing the package, and reading a process's
resident-set figures from /proc (Linux)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def import_lorax_merge():
    """Import lorax_merge; fall back to the source tree (an in-place build)."""
    try:
        import lorax_merge
    except ImportError:
        sys.path.insert(1, str(HERE.parent))
        import lorax_merge
    return lorax_merge


def proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process, where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
