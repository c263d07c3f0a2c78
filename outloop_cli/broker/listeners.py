"""The broker's listening sockets, bound before the child starts and before aiohttp is even imported.

Connections the child makes while the broker stack loads wait in the kernel's backlog, so the child's start-up
and the broker's overlap instead of adding up.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

BACKLOG = 1024


@dataclass
class Listeners:
    broker: socket.socket  # $OUTLOOP_SOCKET: callers authenticated by SO_PEERCRED
    relay: socket.socket | None = None  # base-URL mode behind the in-sandbox relay: peer check and token
    loopback: socket.socket | None = None  # base-URL mode on the host's 127.0.0.1: token only
    proxy: socket.socket | None = None  # the egress proxy behind the in-sandbox relay: peer check

    @property
    def loopback_port(self) -> int | None:
        return int(self.loopback.getsockname()[1]) if self.loopback else None

    def all(self) -> list[socket.socket]:
        return [sock for sock in (self.broker, self.relay, self.loopback, self.proxy) if sock is not None]

    def close(self) -> None:
        for sock in self.all():
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


def bind_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_loopback() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0), backlog=BACKLOG)
    sock.setblocking(False)
    return sock
