"""The proxy's first request on a connection: is it a CONNECT, to where, and the bytes of a raw reply.

Pure, so every malformed or hostile head has a fast test. Only CONNECT is parsed here; any other method is an
absolute-form proxy request, which the broker's HTTP server reads like every other broker request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from outloop_cli.broker.egress import Authority, EgressError, parse_authority

MAX_HEAD = 16 * 1024  # as the broker's HTTP server allows for a request line and headers
_REQUEST_LINE = re.compile(rb"CONNECT ([^\s]+) HTTP/1\.[01]")
_FIELD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*[^\x00-\x08\x0a-\x1f\x7f]*?[ \t]*")
_REASONS = {200: "Connection Established", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            502: "Bad Gateway", 503: "Service Unavailable"}


class BadConnect(ValueError):
    """A CONNECT head that is not well-formed HTTP/1.1; answered 400, never guessed at."""


@dataclass(frozen=True)
class ConnectHead:
    target: Authority
    raw_target: str  # as sent, for the audit when the target does not parse


def head_end(buffer: bytes) -> int:
    """Index just past the blank line ending the head, or -1 while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def is_connect(buffer: bytes) -> bool:
    return buffer.startswith(b"CONNECT ")


def parse_connect(head: bytes) -> ConnectHead:
    """`CONNECT host:port HTTP/1.1` and well-formed header lines; the headers' values are not used."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else []
    if not lines:
        raise BadConnect("incomplete request head")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadConnect("expected `CONNECT host:port HTTP/1.1`")
    for line in lines[1:]:
        if not _FIELD.fullmatch(line):
            raise BadConnect("malformed header line")
    raw_target = match.group(1).decode("ascii", "replace")
    try:
        target = parse_authority(raw_target)
    except EgressError as exc:
        raise BadConnect(str(exc)) from None
    return ConnectHead(target=target, raw_target=raw_target)


def raw_response(status: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    """An HTTP/1.1 answer written straight to the connection (before TLS or instead of a tunnel)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    if status != 200:
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in headers or ()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
