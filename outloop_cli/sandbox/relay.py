"""Inside an isolated network: 127.0.0.1:PORT in the child's namespace, piped to one of the broker's Unix sockets.

Every connection the loop makes to a relayed port is joined to a new connection to its broker socket: the
base-URL listener (where the run token is still required) or the egress proxy (where the broker checks the
relay is in the run's tree). Loaded once the loop runs (`relay_start.py` starts it first).

One `selectors` loop, no asyncio and no threads: every isolated run starts this process, and importing asyncio
cost more start-up than the whole relay does; a thread is not an option anyway, because after
unshare(CLONE_NEWPID) this process may not create one.
"""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Callable, Sequence

CHUNK = 64 * 1024
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
Handler = Callable[[int], None]  # called with the ready events of the file it was registered for


class _Pair:
    """A child's connection and its broker connection. Side i's bytes wait in `pending[i]` until side 1-i takes
    them; while they wait, side i is not read (back-pressure), and an end of file is passed on as a half-close
    once everything before it was delivered."""

    def __init__(self, selector: selectors.BaseSelector, child: socket.socket, broker: socket.socket) -> None:
        self.selector = selector
        self.socks = (child, broker)
        self.pending = [b"", b""]
        self.reading = [True, True]  # side i has not sent its end of file yet
        self.shut = [False, False]  # side i was told the other's end of file (shutdown for writing)
        self.events = [0, 0]  # what side i is registered for
        self.handlers: tuple[Handler, Handler] = (lambda mask: self._ready(0, mask),
                                                  lambda mask: self._ready(1, mask))
        for sock in self.socks:
            sock.setblocking(False)
        self._update()

    def _ready(self, side: int, mask: int) -> None:
        try:
            if mask & _READ:
                try:
                    data = self.socks[side].recv(CHUNK)
                except BlockingIOError:  # woken for nothing
                    data = None
                if data:
                    self.pending[side] = data
                elif data is not None:
                    self.reading[side] = False
                self._deliver(side)
            if mask & _WRITE:
                self._deliver(1 - side)
        except OSError:  # a reset, or a peer that went away mid-write: this pair is over, the others go on
            self.close()
            return
        self._update()

    def _deliver(self, side: int) -> None:
        """Write what side `side` sent to the other side, as much as it takes now."""
        sink = self.socks[1 - side]
        if self.pending[side]:
            try:
                sent = sink.send(self.pending[side])
            except BlockingIOError:
                sent = 0
            self.pending[side] = self.pending[side][sent:]
        if not self.pending[side] and not self.reading[side] and not self.shut[1 - side]:
            sink.shutdown(socket.SHUT_WR)
            self.shut[1 - side] = True

    def _update(self) -> None:
        if not any(self.reading) and not any(self.pending):
            self.close()
            return
        for side, sock in enumerate(self.socks):
            wanted = ((_READ if self.reading[side] and not self.pending[side] else 0)
                      | (_WRITE if self.pending[1 - side] else 0))
            if wanted == self.events[side]:
                continue
            if not wanted:
                self.selector.unregister(sock)
            elif not self.events[side]:
                self.selector.register(sock, wanted, self.handlers[side])
            else:
                self.selector.modify(sock, wanted, self.handlers[side])
            self.events[side] = wanted

    def close(self) -> None:
        for side, sock in enumerate(self.socks):
            if self.events[side]:
                self.selector.unregister(sock)
                self.events[side] = 0
            sock.close()


def _acceptor(selector: selectors.BaseSelector, listener: socket.socket, broker_socket: str) -> Handler:
    def accept(_mask: int) -> None:
        while True:
            try:
                child, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors: the child sees its connection refused, the relay goes on
                return
            # As asyncio's transports do: a response the broker wrote in two pieces must not wait for the
            # child's delayed ACK (Nagle) before its second piece leaves.
            child.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            broker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                broker.connect(broker_socket)  # a Unix socket: it connects at once, or waits in the backlog
            except OSError:
                broker.close()
                child.close()
                continue
            _Pair(selector, child, broker)
    return accept


def relay_until_exit(listeners: Sequence[tuple[int, str]], pid: int, exit_like: Callable[[int], None]) -> None:
    """Serve each (listening descriptor, broker socket) until the process `pid` ends, then `exit_like(its wait
    status)` (which does not return): at once, so open pipes die with us, which is what their peers should see."""
    selector = selectors.DefaultSelector()
    for descriptor, broker_socket in listeners:
        listener = socket.socket(fileno=descriptor)
        listener.setblocking(False)
        selector.register(listener, _READ, _acceptor(selector, listener, broker_socket))
    pidfd = os.pidfd_open(pid)  # no thread may wait (see above): the pidfd turns readable when `pid` ends
    selector.register(pidfd, _READ, lambda _mask: exit_like(os.waitpid(pid, 0)[1]))
    while True:
        for key, mask in selector.select():
            key.data(mask)
