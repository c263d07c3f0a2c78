"""The broker's child-facing HTTP/1.1 server: llhttp (httptools) frames every request, asyncio protocols carry it.

Why not a framework: every request the child sends must end as a broker answer and an audit row, even the ones
the parser refuses, and the handler must see the request target raw, before anything decodes it. What this
module adds to llhttp is policy, never parsing:
- limits on the head (target, header lines, header count), refused like any malformed request;
- only HTTP/1.0 and 1.1 are spoken: llhttp reads a version-less line as HTTP/0.9, which is refused too;
- pipelined requests are answered in order, one at a time; a refused one is answered after those before it, and
  the connection closes behind it, so nothing after an ambiguity is ever read as a request;
- a connection stays open after an answer only when the request's body ended where llhttp said it would
  (an unread body is read and dropped for at most `LINGER` seconds, else the connection closes);
- back-pressure both ways: reading pauses while a body waits for its handler, writing waits for the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from outloop_cli.broker.flow import WriteFlow

MAX_TARGET = 16 * 1024  # the request target, as aiohttp's server allowed before
MAX_FIELD = 16 * 1024  # one header line, name and value
MAX_HEADERS = 128
# The whole head, counted as it arrives: llhttp holds a header line until it ends, so the per-line limit alone
# would be checked only after an endless line had been buffered. Counted per read, so generous.
MAX_HEAD = 1024 * 1024
HIGH_WATER = 256 * 1024  # buffered request body at which reading pauses until the handler takes it
LOW_WATER = 64 * 1024
MAX_QUEUED = 32  # pipelined requests waiting their turn before reading pauses
LINGER = 10.0  # how long an unread request body is read and dropped to keep the connection in step

SPOKEN_VERSIONS = ("1.0", "1.1")
_NO_BODY_STATUSES = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Headers a request carries at most once (aiohttp's list): a second Host or Content-Type is a request two parties
# would read differently.
_SINGLETONS = frozenset({b"content-length", b"content-location", b"content-md5", b"content-range", b"content-type",
                         b"etag", b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})
_PIPELINE = object()  # what pauses reading when too many requests wait their turn
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})

Handler = Callable[["Request"], Awaitable["Response | StreamResponse"]]
# (method, target, status, exception) of a request the parser refused or a handler that failed: the broker's
# answer, already audited.
ErrorHook = Callable[[str, str, int, "BaseException | None"], "Response"]


class MalformedRequest(Exception):
    """The parser refused the request, or it broke one of the limits above."""


# ----- the request ---------------------------------------------------------------------------------------------

class Body:
    """A request body as llhttp frames it, handed to the handler as it arrives."""

    __slots__ = ("_chunks", "_connection", "_continue", "_error", "_size", "_waiter", "complete", "dropping")

    def __init__(self, connection: Connection, expects_continue: bool) -> None:
        self._connection = connection
        self._continue = expects_continue
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False
        self.dropping = False  # the answer went out; what still arrives is read only to find the next request

    def feed(self, data: bytes) -> None:
        if self.dropping:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        if self._size > HIGH_WATER:
            self._connection.pause_reading(self)

    def end(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    @property
    def started(self) -> bool:
        """Some of the body was asked for, so a client waiting on `100-continue` was told to send it."""
        return not self._continue

    async def read_any(self) -> bytes:
        """What arrived since the last call (waiting for some), b"" at the end of the body."""
        if self._continue:
            self._continue = False
            if not self.complete and not self._chunks:
                self._connection.write(_CONTINUE)
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._connection.resume_reading(self)
        return data

    async def chunks(self) -> Any:
        """The body piece by piece, as an async iterator."""
        while data := await self.read_any():
            yield data

    def drop(self) -> None:
        """Nobody will read the rest: keep parsing it (to stay in step with the connection), keep none of it."""
        self.dropping = True
        self._chunks.clear()
        self._size = 0
        self._connection.resume_reading(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    """One request as the child sent it: method and target raw, headers as sent (names' case kept)."""

    __slots__ = ("_headers", "body", "body_exists", "connection", "content_length", "keep_alive", "method",
                 "raw_headers", "raw_path", "version")

    def __init__(self, connection: Connection, method: str, target: str, version: str,
                 raw_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.connection = connection
        self.method = method
        self.raw_path = target
        self.version = version
        self.raw_headers = raw_headers
        self.keep_alive = keep_alive
        self._headers: CIMultiDictProxy[str] | None = None
        length = chunked = expects = None
        for name, value in raw_headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding":
                chunked = value
            elif lowered == b"expect":
                expects = value
        self.content_length = int(length) if length is not None else None  # llhttp checked it is one number
        self.body = Body(connection, expects is not None and expects.strip().lower() == b"100-continue"
                         and version == "1.1")
        self.body_exists = chunked is not None or bool(self.content_length)
        if not self.body_exists:
            self.body.complete = True

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers))
        return self._headers

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.connection.transport

    def with_target(self, target: str) -> Request:
        """The same request (same body, same connection) addressed to `target`."""
        other = Request.__new__(Request)
        for name in Request.__slots__:
            setattr(other, name, getattr(self, name))
        other.raw_path = target
        return other


# ----- responses ---------------------------------------------------------------------------------------------

class Response:
    """A whole answer, written in one go."""

    __slots__ = ("body", "close", "headers", "reason", "status")

    def __init__(self, status: int = 200, *, reason: str | None = None,
                 headers: Mapping[str, str] | CIMultiDict[str] | None = None, body: bytes = b"",
                 content_type: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or {})
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.body = body
        self.close = False

    def force_close(self) -> None:
        self.close = True


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, body=json.dumps(data).encode(), content_type="application/json")


class StreamResponse:
    """An answer whose body is written as it comes: with the length known up front, or chunked."""

    def __init__(self, status: int = 200, *, reason: str | None = None,
                 headers: CIMultiDict[str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = CIMultiDict(headers or {})
        self.content_length: int | None = None
        self._connection: Connection | None = None
        self._chunked = False
        self._bodiless = False
        self._left: int | None = None
        self.finished = False

    @property
    def prepared(self) -> bool:
        return self._connection is not None

    async def prepare(self, request: Request) -> None:
        connection = request.connection
        self._bodiless = request.method == "HEAD" or self.status in _NO_BODY_STATUSES or self.status < 200
        # A HEAD or 304 answer may announce the length of the body it does not carry; 1xx and 204 never do.
        length = None if self.status < 200 or self.status == 204 else self.content_length
        self._chunked = length is None and not self._bodiless and request.version == "1.1"
        closing = connection.closing or not request.keep_alive or (
            length is None and not self._chunked and not self._bodiless)  # HTTP/1.0 without a length: to the close
        data = head(self.status, self.reason, self.headers, length, self._chunked, closing, request.version)
        if closing:
            connection.closing = True
        self._left = None if self._bodiless else length
        self._connection = connection
        connection.answering = True
        connection.write(data)
        await connection.drain()

    async def write(self, data: bytes) -> None:
        connection = self._connection
        assert connection is not None, "prepare() first"
        if self._bodiless or not data:
            return
        if self._left is not None:
            data = data[:self._left]  # never past the announced length: the next answer would start inside it
            self._left -= len(data)
        if self._chunked:
            connection.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            connection.write(data)
        await connection.drain()

    async def write_eof(self) -> None:
        connection = self._connection
        assert connection is not None, "prepare() first"
        if self.finished:
            return
        self.finished = True
        if self._chunked:
            connection.write(b"0\r\n\r\n")
        elif self._left:
            connection.closing = True  # shorter than announced: only a close tells the child so
        await connection.drain()


def head(status: int, reason: str | None, headers: CIMultiDict[str], length: int | None, chunked: bool,
         closing: bool, version: str) -> bytes:
    """A response head. Framing headers are the server's alone; a CR or LF anywhere else is refused."""
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers.items():
        if name.lower() not in _FRAMING:
            lines.append(f"{name}: {value}\r\n")
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    elif chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    if closing:
        lines.append("Connection: close\r\n")
    elif version == "1.0":
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\0" in text:
        raise ValueError("a CR, LF or NUL in a response header or reason")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


# ----- the connection ----------------------------------------------------------------------------------------

class _Refused:
    """A place in the pipeline for a request the parser refused: answered in its turn, then the connection ends."""

    __slots__ = ("error", "method", "target")

    def __init__(self, method: str, target: str, error: BaseException) -> None:
        self.method, self.target, self.error = method, target, error


class Connection(WriteFlow, asyncio.Protocol):
    """One child connection: llhttp's callbacks queue requests, one task answers them in order."""

    def __init__(self, server: HttpServer, handler: Handler) -> None:
        self._server = server
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self.start_flow(self._loop)
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request | _Refused] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading: Request | None = None  # whose body llhttp is parsing
        self._target: list[bytes] = []
        self._target_size = 0
        self._head_size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._stopped = False  # a refused request was queued: nothing after it is parsed
        self._paused_by: set[object] = set()
        self.lost = False
        self.closing = False  # close once the current answer is written
        self.busy = False
        self.answering = False  # the current answer's head is written: a failure now can only cut the connection

    # ----- asyncio's side -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are Transports without subclassing them
        self._server.connections.add(self)
        self._task = self._loop.create_task(self._answer_in_turn())

    def data_received(self, data: bytes) -> None:
        while data and not self._stopped:
            try:
                self._parser.feed_data(data)
                if self._in_head:
                    self._head_size += len(data)
                    if self._head_size > MAX_HEAD:
                        self._refuse(MalformedRequest(f"a request head longer than {MAX_HEAD} bytes"))
                return
            except httptools.HttpParserUpgrade as upgrade:
                # `Upgrade:` or CONNECT: the broker upgrades nothing, so the request was an ordinary one, and
                # whatever follows it is the next request, read by a fresh parser from where llhttp stopped.
                if self._in_head or self._reading is not None:
                    self._refuse(MalformedRequest("an upgrade before its request ended"))
                    return
                self._parser = httptools.HttpRequestParser(self)
                data = data[int(upgrade.args[0]):]
            except (httptools.HttpParserError, ValueError) as exc:
                cause = exc.__cause__ or exc.__context__  # what a callback of ours raised, if it was one
                self._refuse(cause if isinstance(cause, MalformedRequest) else exc)
                return

    def eof_received(self) -> bool | None:
        if self._reading is not None:
            self._reading.body.fail(ConnectionResetError("the client closed before its request body ended"))
        return None  # asyncio closes the transport: the answers in the queue can no longer be delivered

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self._server.connections.discard(self)
        gone = ConnectionResetError("the client went away")
        if self._reading is not None:
            self._reading.body.fail(gone)
        self.fail_drain(gone)
        if not self.busy and self._task is not None:
            self._task.cancel()  # idle: nothing to finish

    # ----- llhttp's callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._target, self._target_size, self._headers, self._in_head, self._head_size = [], 0, [], True, 0

    def on_url(self, fragment: bytes) -> None:
        self._target_size += len(fragment)
        if self._target_size > MAX_TARGET:
            raise MalformedRequest(f"request target longer than {MAX_TARGET} bytes")
        self._target.append(fragment)

    def on_header(self, name: bytes, value: bytes | None) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never read, never forwarded
        value = value or b""
        if len(name) + len(value) > MAX_FIELD:
            raise MalformedRequest(f"a header line longer than {MAX_FIELD} bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise MalformedRequest(f"more than {MAX_HEADERS} headers")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in SPOKEN_VERSIONS:
            raise MalformedRequest(f"HTTP/{version} is not spoken here")
        names = [name.lower() for name, _ in self._headers if name.lower() in _SINGLETONS]
        if len(names) != len(set(names)):
            raise MalformedRequest("a header that may appear once appears twice")
        if version == "1.1" and b"host" not in names:
            raise MalformedRequest("an HTTP/1.1 request without Host")
        if (parser.should_upgrade() or parser.get_method() == b"CONNECT") and any(
                lowered == b"transfer-encoding" or (lowered == b"content-length" and int(value) > 0)
                for lowered, value in ((name.lower(), value) for name, value in self._headers)):
            # llhttp hands over the connection right after such a head, so a body would be read as the next request.
            raise MalformedRequest("a body on an Upgrade or CONNECT request")
        self._in_head = False
        request = Request(self, parser.get_method().decode("ascii"),
                          b"".join(self._target).decode("utf-8", "surrogateescape"), version, self._headers,
                          parser.should_keep_alive())
        self._reading = None if request.body.complete else request
        self._queue.append(request)
        if len(self._queue) > MAX_QUEUED:
            self.pause_reading(_PIPELINE)
        self._wake()

    def on_body(self, data: bytes) -> None:
        if self._reading is not None:
            self._reading.body.feed(data)

    def on_message_complete(self) -> None:
        if self._reading is not None:
            self._reading.body.end()
            self._reading = None

    # ----- flow control -------------------------------------------------------------------------------------

    def pause_reading(self, by: object) -> None:
        if not self._paused_by and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._paused_by.add(by)

    def resume_reading(self, by: object) -> None:
        if by in self._paused_by:
            self._paused_by.discard(by)
            if not self._paused_by and self.transport is not None and not self.lost and not self._stopped:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("the client went away")
        self.transport.write(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("the client went away")
        self.transport.writelines(parts)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client went away")
        await self.drained()

    # ----- answering ----------------------------------------------------------------------------------------

    def _refuse(self, error: BaseException) -> None:
        """Queue the refusal behind the requests before it and read nothing more from this connection."""
        self._stopped = True
        # llhttp reads the method before the target: with no target seen, its method field means nothing.
        method = target = "?"
        if self._in_head and self._target:
            method = self._parser.get_method().decode("ascii", "replace")
            target = b"".join(self._target).decode("utf-8", "surrogateescape")
        request, self._reading = self._reading, None
        if request is not None and request not in self._queue:
            # Its handler has started: the body it is reading ends in an error (the broker answers that request
            # 400 `malformed_http`), and the connection ends behind the answer.
            request.body.fail(MalformedRequest(f"the request body could not be parsed: {error}"))
            self.closing = True
        else:
            if request is not None:  # not started: the refusal takes its place, as if its head had been refused
                self._queue.remove(request)
                method, target = request.method, request.raw_path
            self._queue.append(_Refused(method, target, error))
        if self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _answer_in_turn(self) -> None:
        try:
            while not self.lost:
                if not self._queue:
                    if self.closing:
                        break
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                item = self._queue.popleft()
                if len(self._queue) <= MAX_QUEUED // 2:
                    self.resume_reading(_PIPELINE)
                if isinstance(item, _Refused):
                    response = self._server.on_error(item.method, item.target, 400, item.error)
                    self._send(response, None)
                    break
                self.busy = True
                try:
                    if not await self._answer(item):
                        break
                finally:
                    self.busy = False
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _answer(self, request: Request) -> bool:
        """Run the handler and deliver its answer; whether the connection may carry the next request."""
        response: Response | StreamResponse
        self.answering = False
        try:
            response = await self._handler(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            if self.lost or self.answering:
                return False
            response = self._server.on_error(request.method, request.raw_path, 500, exc)
            response.force_close()
        if isinstance(response, StreamResponse):
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
        else:
            try:
                self._send(response, request)
            except ValueError as exc:  # a header the handler built would have split the head
                refusal = self._server.on_error(request.method, request.raw_path, 500, exc)
                refusal.force_close()
                self._send(refusal, request)
                return False
            await self.drain()
        if self.closing or self.lost:
            return False
        return await self._finish_body(request)

    def _send(self, response: Response, request: Request | None) -> None:
        closing = self.closing or response.close or request is None or not request.keep_alive
        bodiless = (request is not None and request.method == "HEAD") or response.status in _NO_BODY_STATUSES
        data = head(response.status, response.reason, response.headers,
                    None if response.status in _NO_BODY_STATUSES else len(response.body), False, closing,
                    request.version if request is not None else "1.1")
        self.closing = closing
        self.write(data if bodiless else data + response.body)

    async def _finish_body(self, request: Request) -> bool:
        """The answer is out; the request's body must end where llhttp says before the next request is read."""
        body = request.body
        if body.complete:
            return True
        if not body.started:
            return False  # a client waiting on `100-continue` may never send it: only a close ends this cleanly
        body.drop()
        with contextlib.suppress(TimeoutError, MalformedRequest):
            async with asyncio.timeout(LINGER):
                while not body.complete and not self.lost:
                    await body.read_any()
        return body.complete and not self.lost


class HttpServer:
    """The connections of one kind of listener, all answered by one handler (or one per connection)."""

    def __init__(self, handler: Handler | None, on_error: ErrorHook) -> None:
        self._handler = handler
        self.on_error = on_error
        self.connections: set[Connection] = set()
        self._listeners: list[asyncio.AbstractServer] = []

    def __call__(self) -> Connection:
        assert self._handler is not None
        return Connection(self, self._handler)

    def connection(self, handler: Handler) -> Connection:
        return Connection(self, handler)

    async def listen(self, sock: Any, backlog: int) -> None:
        """`backlog` again, since asyncio would otherwise listen() anew with its default of 100."""
        self._listeners.append(await asyncio.get_running_loop().create_server(self, sock=sock, backlog=backlog))

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; idle connections close now, busy ones finish their answer within `grace`."""
        for listener in self._listeners:
            listener.close()
        tasks = []
        for connection in list(self.connections):
            connection.closing = True
            connection._wake()
            if connection._task is not None:
                tasks.append(connection._task)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


def parse_request_line(method: str, target: str) -> tuple[str, str] | None:
    """What the broker's parser makes of `METHOD TARGET HTTP/1.1`: (method, raw target), or None where it refuses
    the line (the broker answers those 400 `malformed_http`).

    `outloop policy test` goes through this, so a method or target the parser rejects is judged as a run would.
    """
    seen: dict[str, Any] = {"target": []}

    class _Line:
        def on_url(self, fragment: bytes) -> None:
            seen["target"].append(fragment)

        def on_headers_complete(self) -> None:
            seen["done"] = True

    parser = httptools.HttpRequestParser(_Line())
    line = f"{method} {target} HTTP/1.1\r\nHost: broker\r\n\r\n".encode("utf-8", "surrogateescape")
    try:
        parser.feed_data(line)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    raw = b"".join(seen["target"])
    if not seen.get("done") or len(raw) > MAX_TARGET:
        return None
    return parser.get_method().decode("ascii"), raw.decode("utf-8", "surrogateescape")
