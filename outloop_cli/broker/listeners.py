"""The broker's listening sockets, bound before the child starts and before aiohttp is even imported.

Connections the child makes while the broker stack loads wait in the kernel's backlog, so the child's start-up
and the broker's overlap instead of adding up.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from outloop_cli.broker.peer import peer_pid

if TYPE_CHECKING:
    import asyncio  # the runner binds the listeners before the child starts; the event loop comes after it

BACKLOG = 1024
HAND_OVER_SECONDS = 10.0  # the relay sends its listener right after connecting, before the loop even exists


@dataclass
class Listeners:
    broker: socket.socket  # $OUTLOOP_SOCKET: callers authenticated by SO_PEERCRED
    # Inside an isolated network, the relay hands over its 127.0.0.1:PORT listeners of the child's namespace on
    # these Unix sockets (take_over): base-URL mode (token) and the egress proxy. Only the run's network
    # namespace reaches what they hand over.
    relay: socket.socket | None = None
    loopback: socket.socket | None = None  # base-URL mode on the host's 127.0.0.1: token only
    proxy: socket.socket | None = None
    relay_port: int | None = None
    proxy_port: int | None = None

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


class HandOverRefused(Exception):
    """What arrived on a hand-over socket is not the relay's listener; the message says why (no secrets here)."""


async def take_over(channel: socket.socket, port: int, in_run: Callable[[int], bool]) -> socket.socket:
    """The listening socket the relay made on 127.0.0.1:`port` of the child's network namespace.

    `channel` serves exactly one connection from the run's tree (`in_run`, from SO_PEERCRED) and is closed after
    it: the relay connects before it spawns the loop, so that connection is the relay's, and nothing the loop
    sends later can replace the listener. Connections from outside the run (another process of the operator's
    that found the socket first) are dropped unread, so they cannot knock the run's listener out either. What the
    relay sends must be one TCP socket listening on exactly that address.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    path = channel.getsockname()
    try:
        while True:
            conn, _ = await loop.sock_accept(channel)
            pid = peer_pid(conn)
            if pid is not None and in_run(pid):
                break
            conn.close()
    finally:
        channel.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    with conn:
        async with asyncio.timeout(HAND_OVER_SECONDS):
            descriptors = await _receive_descriptors(loop, conn)
    listeners = [sock for sock in map(_as_socket, descriptors) if sock is not None]
    if len(descriptors) == len(listeners) == 1 and _is_listening_on(listeners[0], port):
        return listeners[0]
    for sock in listeners:
        sock.close()
    raise HandOverRefused(f"the relay sent {len(descriptors)} descriptor(s), not one listener on 127.0.0.1:{port}")


async def _receive_descriptors(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> list[int]:
    fds = array.array("i")
    while True:
        try:
            # Close-on-exec as they arrive, like every descriptor outloop opens (PEP 446): nothing it starts
            # later may inherit a listener of the loop's namespace.
            _, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(fds.itemsize * 4), socket.MSG_CMSG_CLOEXEC)
            break
        except BlockingIOError:
            await _readable(loop, conn)
    for level, kind, data in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn, wake)
    try:
        await readable
    finally:
        loop.remove_reader(conn)


def _as_socket(descriptor: int) -> socket.socket | None:
    """The socket behind a received descriptor; anything else (a pipe, a file) is closed, never kept."""
    try:
        return socket.socket(fileno=descriptor)
    except OSError:
        os.close(descriptor)
        return None


def _is_listening_on(sock: socket.socket, port: int) -> bool:
    try:
        return (sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                and sock.getsockname() == ("127.0.0.1", port))
    except OSError:
        return False
