"""Plain tunnels to `egress` hosts: resolve once, refuse a name that lands on a credential's upstream, splice.

The bytes are not read (no interception, the child's TLS goes end to end); they are counted each way, and the
proxy audits host, port, byte counts and duration when the tunnel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from outloop_cli.broker.egress import Authority

CHUNK = 64 * 1024


class TunnelRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Counts:
    up: int = 0  # child -> upstream
    down: int = 0  # upstream -> child


async def addresses(host: str, port: int) -> set[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {(str(info[4][0]), port) for info in infos}


async def resolve_target(target: Authority, credential_authorities: Iterable[tuple[str, int]]) -> list[str]:
    """The addresses the tunnel may use, in the order to try them. Refused when any address of the name (or the
    name's own literal) is a credential's upstream: a tunnel there would reach it around the policy. The
    addresses checked are the addresses connected to, so a second DNS answer cannot move the tunnel there."""
    found = await addresses(target.host, target.port)
    if not found:
        raise TunnelRefused("egress_unresolvable", f"cannot resolve {target.host}")
    guarded: set[tuple[str, int]] = set()
    for host, port in credential_authorities:
        guarded |= await addresses(host, port)
    if found & guarded:
        raise TunnelRefused("resolves_to_credential_host",
                            f"{target} resolves to a credential's upstream; reach it by its own name")
    return sorted(address for address, _ in found)


async def connect_first(addresses: list[str], port: int, timeout: float
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    error: Exception = OSError("no address")
    for address in addresses:
        try:
            return await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        except (OSError, TimeoutError) as exc:
            error = exc
    raise error


async def splice(child: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], counts: Counts) -> None:
    """Copy both ways until both sides are done; a half-close is passed on, so request/response framing works."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(CHUNK):
                if up:
                    counts.up += len(data)
                else:
                    counts.down += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    try:
        await asyncio.gather(pump(child[0], upstream[1], True), pump(upstream[0], child[1], False))
    finally:
        for _, writer in (child, upstream):
            with contextlib.suppress(Exception):
                writer.close()
