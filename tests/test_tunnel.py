"""The tunnel's two jobs, in process: refuse a target that lands on a credential's upstream, and splice bytes
both ways, counted, passing a half-close on (so a request/response exchange inside the tunnel completes)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from outloop_cli.broker.egress import parse_authority
from outloop_cli.broker.tunnel import Counts, TunnelRefused, resolve_target, splice


def test_a_target_resolving_to_a_credential_upstream_is_refused() -> None:
    with pytest.raises(TunnelRefused) as caught:
        asyncio.run(resolve_target(parse_authority("127.0.0.1:8443"), [("localhost", 8443)]))
    assert caught.value.reason == "resolves_to_credential_host"


def test_the_same_address_on_another_port_is_a_different_upstream() -> None:
    assert asyncio.run(resolve_target(parse_authority("127.0.0.1:9443"), [("localhost", 8443)])) == ["127.0.0.1"]


def test_an_unresolvable_target_is_refused() -> None:
    with pytest.raises(TunnelRefused) as caught:
        asyncio.run(resolve_target(parse_authority("no-such-host.invalid:443"), []))
    assert caught.value.reason == "egress_unresolvable"


async def _splice_once() -> tuple[bytes, bytes, Counts]:
    child_far, child_near = socket.socketpair()
    upstream_near, upstream_far = socket.socketpair()
    counts = Counts()
    child = await asyncio.open_connection(sock=child_near)
    upstream = await asyncio.open_connection(sock=upstream_near)
    task = asyncio.ensure_future(splice(child, upstream, counts))
    loop = asyncio.get_running_loop()
    for sock in (child_far, upstream_far):
        sock.setblocking(False)
    await loop.sock_sendall(child_far, b"GET / HTTP/1.1\r\n\r\n")
    child_far.shutdown(socket.SHUT_WR)  # the child is done sending; the upstream must see EOF and still answer
    request = b""
    while chunk := await loop.sock_recv(upstream_far, 1024):
        request += chunk
    await loop.sock_sendall(upstream_far, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    upstream_far.close()
    answer = b""
    while chunk := await loop.sock_recv(child_far, 1024):
        answer += chunk
    await task
    child_far.close()
    return request, answer, counts


def test_splice_copies_both_ways_counts_and_passes_the_half_close_on() -> None:
    request, answer, counts = asyncio.run(_splice_once())
    assert request == b"GET / HTTP/1.1\r\n\r\n"
    assert answer == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert (counts.up, counts.down) == (len(request), len(answer))
