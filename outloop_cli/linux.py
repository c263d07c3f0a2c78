"""Thin wrappers over the Linux prctl calls outloop relies on, with a portable "not here" answer.

Kept apart so the supervisor, the sandbox and `outloop doctor` ask the kernel the same way.
"""

from __future__ import annotations

import ctypes
import sys

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int = 0) -> int:
    global _libc
    if not sys.platform.startswith("linux"):
        return -1
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded; find_library would spawn ldconfig
    return int(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))


def set_child_subreaper() -> bool:
    """Orphaned grandchildren (double-forked daemons) re-parent to us, so we can find and kill them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1) == 0


def set_not_dumpable() -> bool:
    """No core dumps, and same-uid processes can no longer read our /proc/<pid>/mem, environ or ptrace us."""
    return _prctl(PR_SET_DUMPABLE, 0) == 0


def is_dumpable() -> bool:
    """True where the flag is on or cannot be read (non-Linux): only a definite 0 counts as hardened."""
    return _prctl(PR_GET_DUMPABLE) != 0
