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
import time
from collections.abc import Callable, Sequence

CHUNK = 64 * 1024
# Out of descriptors, the listeners rest this long at most (asyncio's ACCEPT_RETRY_DELAY), unless a pair closes.
ACCEPT_RETRY_DELAY = 1.0
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
Handler = Callable[[int], None]  # called with the ready events of the file it was registered for


class _Pair:
    """A child's connection and its broker connection. Side i's bytes wait in `pending[i]` until side 1-i takes
    them; while they wait, side i is not read (back-pressure), and an end of file is passed on as a half-close
    once everything before it was delivered."""

    def __init__(self, selector: selectors.BaseSelector, child: socket.socket, broker: socket.socket,
                 closed: Callable[[], None]) -> None:
        self.selector = selector
        self.socks = (child, broker)
        self.closed = closed  # told when this pair's descriptors are free again
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
        self.closed()


class _Acceptor:
    """Joins each connection a listener takes to a new broker connection, while descriptors last.

    Out of descriptors (the loop can open connections until the relay has none: each costs the relay two), accept()
    fails and the listener stays readable: watched on, it would wake the relay at once, forever, and burn a core.
    So the listeners rest (unwatched; new connections wait in the backlog, as they do while the relay starts) until
    a pair closes and gives its descriptors back, or ACCEPT_RETRY_DELAY has passed (ENFILE: the whole system ran out,
    and another process may give some back). Pairs already open are served all along."""

    def __init__(self, selector: selectors.BaseSelector, listeners: Sequence[tuple[socket.socket, str]]) -> None:
        self.selector = selector
        self.listeners = listeners
        self.resting_until: float | None = None
        self._watch()

    def _watch(self) -> None:
        for listener, broker_socket in self.listeners:
            self.selector.register(listener, _READ,
                                   lambda _mask, listener=listener, path=broker_socket: self._accept(listener, path))
        self.resting_until = None

    def _rest(self) -> None:
        if self.resting_until is None:  # both listeners may fail in one round of events
            for listener, _ in self.listeners:
                self.selector.unregister(listener)
        self.resting_until = time.monotonic() + ACCEPT_RETRY_DELAY

    def wake(self) -> None:
        """A pair closed: its descriptors are there to accept with again."""
        if self.resting_until is not None:
            self._watch()

    def resting_for(self) -> float | None:
        """How long the listeners rest yet: the longest the relay may wait for other events (None: no limit)."""
        return None if self.resting_until is None else max(0.0, self.resting_until - time.monotonic())

    def wake_if_rested(self) -> None:
        if self.resting_until is not None and time.monotonic() >= self.resting_until:
            self._watch()

    def _accept(self, listener: socket.socket, broker_socket: str) -> None:
        while True:
            try:
                child, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # gone before we took it: the next one
                continue
            except OSError:  # out of descriptors (EMFILE, ENFILE) or of kernel memory: rest, do not spin
                self._rest()
                return
            # As asyncio's transports do: a response the broker wrote in two pieces must not wait for the
            # child's delayed ACK (Nagle) before its second piece leaves.
            child.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                broker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError:  # the child's connection took the last descriptor: it is closed unserved
                child.close()
                self._rest()
                return
            try:
                broker.connect(broker_socket)  # a Unix socket: it connects at once, or waits in the backlog
            except OSError:
                broker.close()
                child.close()
                continue
            _Pair(self.selector, child, broker, self.wake)


def relay_until_exit(listeners: Sequence[tuple[int, str]], pid: int, exit_like: Callable[[int], None]) -> None:
    """Serve each (listening descriptor, broker socket) until the process `pid` ends, then `exit_like(its wait
    status)` (which does not return): at once, so open pipes die with us, which is what their peers should see."""
    selector = selectors.DefaultSelector()
    sockets = [(socket.socket(fileno=descriptor), broker_socket) for descriptor, broker_socket in listeners]
    for listener, _ in sockets:
        listener.setblocking(False)
    acceptor = _Acceptor(selector, sockets)
    pidfd = os.pidfd_open(pid)  # no thread may wait (see above): the pidfd turns readable when `pid` ends
    selector.register(pidfd, _READ, lambda _mask: exit_like(os.waitpid(pid, 0)[1]))
    while True:
        for key, mask in selector.select(acceptor.resting_for()):
            key.data(mask)
        acceptor.wake_if_rested()
