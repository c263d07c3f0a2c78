"""Who is on the other end of the broker's Unix socket: SO_PEERCRED and the process-tree walk.

Only the run's child and its descendants may use the broker; a same-uid process elsewhere gets 401.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

_UCRED = struct.Struct("3i")
MAX_TREE_DEPTH = 4096


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def peer_pid(sock: _HasSockopt) -> int | None:
    """The connecting process's pid as the kernel recorded it at connect time (not spoofable)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, _uid, _gid = _UCRED.unpack(raw)
    return pid if pid > 0 else None


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name may contain spaces or ')' itself: the fields we want follow the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def is_in_run_tree(pid: int, child_pid: int, supervisor_pid: int) -> bool:
    """True for the child, its descendants, and orphans the supervisor (a subreaper) adopted.

    The supervisor's only children are the run's processes, so "parent is the supervisor" is part of the tree;
    the supervisor itself is not a client.
    """
    if pid == supervisor_pid:
        return False
    current: int | None = pid
    for _ in range(MAX_TREE_DEPTH):
        if current is None or current <= 1:
            return False
        if current in (child_pid, supervisor_pid):
            return True
        current = parent_pid(current)
    return False
