"""Thin wrappers over the Linux prctl calls outloop relies on, with a portable "not here" answer.

Kept apart so the supervisor, the sandbox and `outloop doctor` ask the kernel the same way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
KEYCTL_JOIN_SESSION_KEYRING = 1
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}

_libc: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL | None:
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded; find_library would spawn ldconfig
    return _libc


def _prctl(option: int, arg: int = 0) -> int:
    libc = _load()
    return -1 if libc is None else int(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))


def set_child_subreaper() -> bool:
    """Orphaned grandchildren (double-forked daemons) re-parent to us, so we can find and kill them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1) == 0


def set_not_dumpable() -> bool:
    """No core dumps, and same-uid processes can no longer read our /proc/<pid>/mem, environ or ptrace us."""
    return _prctl(PR_SET_DUMPABLE, 0) == 0


def is_dumpable() -> bool:
    """True where the flag is on or cannot be read (non-Linux): only a definite 0 counts as hardened."""
    return _prctl(PR_GET_DUMPABLE) != 0


def join_anonymous_session_keyring() -> bool:
    """Leave the session keyring of whoever started outloop (a login's, holding its keys) for a new empty one, so
    the child inherits nothing from it. Namespaces do not help: the session keyring crosses fork, exec and
    unshare, and the child's uid still owns its keys. Called right before the child is spawned, once every
    secret (a `cmd:` source may read that keyring) is resolved. False only when the kernel has keyrings and
    refused; a kernel without them (ENOSYS) has nothing to inherit."""
    libc = _load()
    number = SYS_KEYCTL.get(os.uname().machine)
    if libc is None or number is None:
        return True
    return libc.syscall(number, KEYCTL_JOIN_SESSION_KEYRING, None) >= 0 or ctypes.get_errno() == errno.ENOSYS
