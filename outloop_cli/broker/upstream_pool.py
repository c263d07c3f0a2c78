"""The broker's pooled upstream client: keep-alive HTTP/1.1 over asyncio, responses parsed by llhttp.

It does what the broker asked of aiohttp's ClientSession and no more: no redirects followed, no cookies, no
proxies from the environment, TLS verified against the system roots (or a credential's own context), connect and
read timeouts, streamed bodies both ways with back-pressure, gzip and deflate decoded so redaction sees the
plain text. The request head is written from values the broker already validated; a header that could still
break the framing (CR, LF or NUL, or a name that is not a token) is refused, never sent.
"""

from __future__ import annotations

import asyncio
import re
import ssl as ssl_module
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from types import TracebackType

from multidict import CIMultiDict
from yarl import URL

from outloop_cli.broker.upstream_conn import Head, UpstreamConnection, UpstreamError

__all__ = ["Timeouts", "UpstreamError", "UpstreamPool", "UpstreamResponse"]

LIMIT = 256  # open connections, all hosts together
KEEPALIVE = 30.0  # seconds an idle connection is kept
DECODE_CHUNK = 64 * 1024  # at most this much decoded output per step, so a compressed bomb cannot balloon
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 for these
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})


@dataclass(frozen=True)
class Timeouts:
    connect: float | None  # getting a connection: waiting for a pool slot, TCP connect and TLS handshake
    read: float | None  # the longest wait for the next bytes of the response


class UpstreamResponse:
    """A response whose body is read incrementally; leaving `async with` returns or closes its connection."""

    def __init__(self, release: Callable[[UpstreamConnection, bool], None], conn: UpstreamConnection, head: Head,
                 read_timeout: float | None, writer: asyncio.Task[None] | None) -> None:
        self._release = release
        self._conn: UpstreamConnection | None = conn
        self._read_timeout = read_timeout
        self._writer = writer
        self.status = head.status
        self.reason = head.reason.decode("utf-8", "surrogateescape")
        self.raw_headers = tuple(head.raw_headers)
        self.headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in head.raw_headers)
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None  # llhttp checked it is one number
        codings = [token.strip().lower() for value in self.headers.getall("Content-Encoding", ())
                   for token in value.split(",")]
        # One coding at most is decoded; with several the body is passed on as it is (the broker refuses it).
        self._decoder = _Decoder(codings[0]) if len(codings) == 1 and codings[0] in _Decoder.CODINGS else None

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The (decoded) body as it arrives; the connection goes back to the pool after the last piece."""
        conn = self._conn
        if conn is None:
            return
        while data := await conn.read_body(self._read_timeout):
            if self._decoder is None:
                yield data
            else:
                for piece in self._decoder.feed(data):
                    yield piece
        if self._decoder is not None:
            self._decoder.end()
        self.release()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_any()])

    def release(self) -> None:
        """Back to the pool when the exchange ended cleanly; closed otherwise: an unread body, a request body the
        upstream answered before it had all of it, any doubt."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        clean = self._writer is None or self._writer.done()
        if not clean:
            self._writer.cancel()  # type: ignore[union-attr]
        self._release(conn, clean)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


Key = tuple[str, str, int, int]


class UpstreamPool:
    """Idle keep-alive connections per (scheme, host, port, TLS context); at most `limit` busy at once."""

    def __init__(self, limit: int = LIMIT, keepalive: float = KEEPALIVE) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._idle: dict[Key, list[UpstreamConnection]] = {}
        self._busy = 0
        self._slots: deque[asyncio.Future[None]] = deque()
        self._default_tls: ssl_module.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, method: str, url: URL, *, headers: CIMultiDict[str],
                      data: bytes | AsyncIterator[bytes] | None, timeout: Timeouts,
                      ssl: ssl_module.SSLContext | bool = True) -> UpstreamResponse:
        """Send one request and return once the response head is in. The body is `data`: bytes, a stream
        (sent with the caller's Content-Length, else chunked), or None."""
        message, stream, length = _serialise(method, url, headers, data)
        tls = self._tls(ssl) if url.scheme == "https" else None
        key = (url.scheme, url.raw_host or "", url.port or 0, id(tls))
        release = partial(self._release, key)
        retry = method in _RETRYABLE and stream is None
        while True:
            conn, reused = await self._acquire(key, tls, url, timeout.connect)
            conn.begin(expect_body=method != "HEAD")
            writer: asyncio.Task[None] | None = None
            try:
                conn.write(message)
                if stream is not None:
                    writer = asyncio.get_running_loop().create_task(_pump(conn, stream, length))
                answer = await conn.read_head(timeout.read)
            except BaseException as exc:
                if writer is not None:
                    writer.cancel()
                release(conn, False)
                # A pooled connection the upstream closed while idle, before any answer: the keep-alive race.
                if isinstance(exc, UpstreamError) and retry and reused and not conn.received_any:
                    retry = False
                    continue
                raise
            return UpstreamResponse(release, conn, answer, timeout.read, writer)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # ----- connections -----------------------------------------------------------------------------------

    async def _acquire(self, key: Key, tls: ssl_module.SSLContext | None, url: URL, connect_timeout: float | None
                       ) -> tuple[UpstreamConnection, bool]:
        if self._busy < self._limit:  # the common case, a pooled connection at hand: no timer needed
            conn = self._pop_idle(key)
            if conn is not None:
                self._busy += 1
                return conn, True
        async with asyncio.timeout(connect_timeout):
            while self._busy >= self._limit:
                slot = asyncio.get_running_loop().create_future()
                self._slots.append(slot)
                await slot
            self._busy += 1
            try:
                conn = self._pop_idle(key)  # one may have come back while this waited
                if conn is not None:
                    return conn, True
                return await self._connect(url, tls), False
            except BaseException:
                self._busy -= 1
                self._hand_over_slot()
                raise

    def _pop_idle(self, key: Key) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, key: Key, conn: UpstreamConnection, clean: bool) -> None:
        self._busy -= 1
        if clean and conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
            self._schedule_sweep()
        else:
            conn.close()
        self._hand_over_slot()

    async def _connect(self, url: URL, tls: ssl_module.SSLContext | None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        host, port = url.raw_host or "", url.port or (443 if tls else 80)
        try:
            _, conn = await loop.create_connection(lambda: UpstreamConnection(loop), host, port,
                                                   ssl=tls, server_hostname=host if tls is not None else None)
        except OSError as exc:  # refused, unreachable, unresolvable, or a certificate that does not verify
            raise UpstreamError(f"cannot connect: {type(exc).__name__}") from None
        return conn

    def _hand_over_slot(self) -> None:
        while self._slots and self._busy < self._limit:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def _tls(self, ssl: ssl_module.SSLContext | bool) -> ssl_module.SSLContext:
        if isinstance(ssl, ssl_module.SSLContext):
            return ssl
        if not ssl:
            raise ValueError("outloop always verifies upstream TLS")
        if self._default_tls is None:
            self._default_tls = ssl_module.create_default_context()
        return self._default_tls

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than the keep-alive time."""
        self._sweeper = None
        deadline = time.monotonic() - self._keepalive
        for conns in self._idle.values():
            stale = [conn for conn in conns if conn.closed or conn.idle_since <= deadline]
            for conn in stale:
                conns.remove(conn)
                conn.close()
        if any(self._idle.values()):
            self._schedule_sweep()


def _serialise(method: str, url: URL, headers: CIMultiDict[str], data: bytes | AsyncIterator[bytes] | None
               ) -> tuple[bytes, AsyncIterator[bytes] | None, int | None]:
    """(head with any bytes body, body stream, the stream's declared length or None for chunked).

    Framing is this function's alone: a caller's Transfer-Encoding or Host is never copied; a caller's
    Content-Length is kept for a stream (which must then match it) and checked against a bytes body."""
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise UpstreamError(f"refusing to send header {name[:40]!r}: it would break the request's framing")
        if name.lower() not in _FRAMING:
            lines.append(f"{name}: {value}")
    declared = headers.get("Content-Length")
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        raise UpstreamError("refusing to send a Content-Length that is not a number")
    length = int(declared) if declared is not None else None
    stream = None
    if isinstance(data, bytes):
        if length is not None and length != len(data):
            raise UpstreamError("the body does not match its Content-Length")
        lines.append(f"Content-Length: {len(data)}")
    elif data is not None:
        stream = data
        lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    elif method not in _NO_BODY_METHODS:
        lines.append("Content-Length: 0")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    return (head + data if isinstance(data, bytes) else head), stream, length


async def _pump(conn: UpstreamConnection, body: AsyncIterator[bytes], declared: int | None) -> None:
    """Stream the request body up (chunked when `declared` is None), waiting whenever the upstream's socket is
    full. Whatever fails here (the child's body too long, the child gone) fails the exchange with that error."""
    sent = 0
    try:
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if declared is not None and sent > declared:
                raise UpstreamError("the request body is longer than its Content-Length")
            conn.write_parts([b"%x\r\n" % len(chunk), chunk, b"\r\n"] if declared is None else [chunk])
            await conn.drain()
        if declared is not None and sent != declared:
            raise UpstreamError("the request body is shorter than its Content-Length")
        if declared is None:
            conn.write(b"0\r\n\r\n")
    except Exception as exc:
        conn.abort(exc)


class _Decoder:
    """gzip or deflate, decoded in bounded steps; concatenated gzip members are all decoded."""

    CODINGS = frozenset({"gzip", "x-gzip", "deflate"})

    def __init__(self, coding: str) -> None:
        self._gzip = coding != "deflate"
        self._zlib: zlib._Decompress | None = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._zlib is None:
                # Some servers send raw deflate for "deflate"; a zlib stream starts with method 8 in its low nibble.
                wbits = 16 + zlib.MAX_WBITS if self._gzip else (zlib.MAX_WBITS if data[0] & 0x0F == 8
                                                                 else -zlib.MAX_WBITS)
                self._zlib = zlib.decompressobj(wbits=wbits)
            try:
                out = self._zlib.decompress(data, DECODE_CHUNK)
                while True:
                    if out:
                        yield out
                    if not self._zlib.unconsumed_tail:
                        break
                    out = self._zlib.decompress(self._zlib.unconsumed_tail, DECODE_CHUNK)
            except zlib.error:
                raise UpstreamError("the upstream's compressed body is corrupt") from None
            if not self._zlib.eof:
                return
            if not self._gzip:
                if self._zlib.unused_data:
                    raise UpstreamError("the upstream sent bytes after its deflate stream")
                return
            data, self._zlib = self._zlib.unused_data, None  # the next gzip member

    def end(self) -> None:
        if self._zlib is not None and not self._zlib.eof:
            raise UpstreamError("the upstream's compressed body ended early")
