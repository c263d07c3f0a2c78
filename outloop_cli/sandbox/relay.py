"""Inside an isolated network: 127.0.0.1:PORT in the child's namespace, piped to one of the broker's Unix sockets.

Every connection the loop makes to a relayed port is joined to a new connection to its broker socket: the
base-URL listener (where the run token is still required) or the egress proxy (where the broker checks the
relay is in the run's tree). Standard library only; imported by the sandbox init only when a
run needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Callable, Sequence


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof() if writer.can_write_eof() else writer.close()


async def _serve_connection(broker_socket: str, client_reader: asyncio.StreamReader,
                            client_writer: asyncio.StreamWriter) -> None:
    try:
        broker_reader, broker_writer = await asyncio.open_unix_connection(broker_socket)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(_pipe(client_reader, broker_writer), _pipe(broker_reader, client_writer))
    for writer in (client_writer, broker_writer):
        writer.close()


def relay_until_exit(listeners: Sequence[tuple[socket.socket, str]], pid: int,
                     exit_like: Callable[[int], None]) -> None:
    """Serve each (listener, broker socket) until the process `pid` ends, then `exit_like(its wait status)`
    (which does not return)."""
    asyncio.run(_relay(listeners, pid, exit_like))


async def _relay(listeners: Sequence[tuple[socket.socket, str]], pid: int, exit_like: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # a child hanging up mid-pipe is not news
    servers = [await asyncio.start_server(functools.partial(_serve_connection, broker_socket), sock=listener)
               for listener, broker_socket in listeners]
    exited: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not exited.done():
            exited.set_result(None)

    pidfd = os.pidfd_open(pid)  # no thread may wait: after unshare(CLONE_NEWPID) this process cannot make one
    loop.add_reader(pidfd, settle)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        await exited
        exit_like(os.waitpid(pid, 0)[1])  # at once: open pipes die with us, which is what their peers should see
