"""One keep-alive HTTP/1.1 connection to an upstream, its responses parsed by llhttp (httptools).

The connection never interprets framing itself: llhttp decides where a response ends. What this module adds is
the policy on top: bounded heads, back-pressure on bodies, and a connection that is reused only when its
previous exchange ended exactly where llhttp said it would. Anything else (a parse error, bytes after the end,
an early close, an abandoned body) closes it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import httptools

from outloop_cli.broker.flow import WriteFlow

MAX_FIELD = 8190  # one header line, as aiohttp's client allowed
MAX_HEAD = 256 * 1024  # the whole response head: an upstream cannot make the broker hold more
HIGH_WATER = 256 * 1024  # buffered body bytes at which reading pauses until the child has taken them
LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The upstream broke the exchange: unreachable, closed early, or sent a response llhttp refused."""


class Head:
    """Status line and headers of a final (non-1xx) response."""

    __slots__ = ("eof_framed", "raw_headers", "reason", "status", "unreadable")

    def __init__(self, status: int, reason: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers
        codings = b",".join(value for name, value in raw_headers if name.lower() == b"transfer-encoding")
        # Only chunked is undone here; any other transfer coding would reach the redactor still encoded.
        self.unreadable = bool(codings) and codings.strip().lower() != b"chunked"
        # Neither a length nor chunked coding: the body runs to the close (RFC 9112 section 6.3, item 8).
        self.eof_framed = not codings and not any(name.lower() == b"content-length" for name, _ in raw_headers)


class UpstreamConnection(WriteFlow, asyncio.Protocol):
    """Carries one exchange at a time; `reusable` says whether the pool may hand it out again."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.start_flow(loop)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False  # has carried an exchange: an early close is then the keep-alive race, not a refusal
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._in_head = False
        self._head: Head | None = None
        self._complete = False
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._received_any = False
        self._keep_alive = False
        self._expect_body = True

    # ----- the pool's side -------------------------------------------------------------------------------

    def begin(self, expect_body: bool) -> None:
        """Start an exchange: a fresh parser, so nothing of the previous response can carry over.

        `expect_body` is False for HEAD: llhttp cannot be told so, so the response ends with its head here, and
        the connection is not reused (its parser would still wait for the body the headers announce)."""
        self._parser = httptools.HttpResponseParser(self)
        self._expect_body = expect_body
        self._head_bytes = 0
        self._headers, self._reason, self._in_head, self._head = [], b"", True, None
        self._complete = self._received_any = self._keep_alive = False
        self._body.clear()
        self._buffered = 0
        self._error = None
        self.used = True

    @property
    def reusable(self) -> bool:
        """The response ended where llhttp said, was read to the end, nothing followed it, and both sides agree
        the connection stays open."""
        return (not self.closed and self._complete and self._error is None and not self._body
                and self._keep_alive and self._head is not None)

    @property
    def received_any(self) -> bool:
        return self._received_any

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise UpstreamError("the upstream closed the connection")
        self.transport.write(data)

    def write_parts(self, parts: list[bytes]) -> None:
        if self.transport is None or self.closed:
            raise UpstreamError("the upstream closed the connection")
        self.transport.writelines(parts)

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        await self.drained()

    async def read_head(self, timeout: float | None) -> Head:
        while self._head is None:
            await self._wait(timeout)
        return self._head

    async def read_body(self, timeout: float | None) -> bytes:
        """The body bytes buffered so far (waiting for some), b"" once the response is complete."""
        while not self._body:
            if self._complete:
                return b""
            await self._wait(timeout)
        data = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self, error: BaseException) -> None:
        """Fail the exchange from outside (a timeout): the connection cannot be trusted any more."""
        self._fail(error)

    async def _wait(self, timeout: float | None) -> None:
        """Until the parser makes progress; a timeout or an error ends the exchange and the connection."""
        if self._error is not None:
            raise self._error
        if self.closed:
            raise UpstreamError("the upstream closed the connection")
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        except TimeoutError as exc:
            self._fail(exc)
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.fail_drain(error)

    # ----- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes while idle, or after the response ended: the connection is out of step.
            self._fail(UpstreamError("the upstream sent bytes outside a response"))
            return
        self._received_any = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, UpstreamError) else None
            self._fail(cause or UpstreamError(f"malformed response from the upstream: {exc}"))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(UpstreamError("the upstream's response head is too large"))
                return
        if self._buffered > HIGH_WATER and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is not None and not self._complete and self._head.eof_framed and self._error is None:
            self._complete = True  # the close is this body's end
            self._keep_alive = False
            self._wake()
        elif not self._complete:
            self._fail(UpstreamError("the upstream closed the connection before the response ended"))
        self.fail_drain(UpstreamError("the upstream closed the connection"))

    # ----- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head is not None:
            raise UpstreamError("the upstream sent a second response")

    def on_status(self, status: bytes) -> None:
        self._reason += status
        if len(self._reason) > MAX_FIELD:
            raise UpstreamError("the upstream's status line is too long")

    def on_header(self, name: bytes, value: bytes | None) -> None:
        if not self._in_head:
            return  # a trailer after a chunked body: dropped, as no one downstream asked for trailers
        if len(name) + len(value or b"") > MAX_FIELD:
            raise UpstreamError("the upstream sent a header line that is too long")
        self._headers.append((name, value or b""))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): dropped; the final response follows.
            self._headers, self._reason = [], b""
            return
        head = Head(status, self._reason, self._headers)
        if head.unreadable:
            raise UpstreamError("the upstream used a transfer coding other than chunked")
        self._in_head = False
        self._head = head
        if not self._expect_body:
            self._complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head is None or self._complete:
            return
        self._body.append(body)
        self._buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of an interim answer
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._wake()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
