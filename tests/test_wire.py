"""Spec for outloop_cli.broker.wire: the broker's child-facing HTTP/1.1 server, on real sockets.

The server is driven with exact bytes from a raw socket, so requests can be framed the way hostile children frame
them. What matters: every request the parser accepts reaches the handler once, in order, with exactly the body
llhttp framed; every request it refuses gets the error hook's answer in its turn and nothing after it is read; and
a connection carries the next request only when the previous one ended where llhttp said.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httptools
import pytest

from outloop_cli.broker.wire import (
    HIGH_WATER,
    LINGER,
    MAX_HEAD,
    MAX_HEADERS,
    HttpServer,
    MalformedRequest,
    Request,
    Response,
    StreamResponse,
    json_response,
    parse_request_line,
)

Handler = Callable[[Request], Awaitable[Response | StreamResponse]]
HOST = "Host: broker\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Seen:
    """What the handler and the error hook were given."""

    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    refused: list[tuple[str, str, int, str]] = field(default_factory=list)


def parse_answers(data: bytes) -> list[Answer]:
    answers: list[Answer] = []

    class Collect:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode().lower()] = value.decode()

        def on_body(self, chunk: bytes) -> None:
            self.body += chunk

        def on_message_complete(self) -> None:
            answers.append(Answer(parser.get_status_code(), self.headers, self.body))
            self.headers, self.body = {}, b""

    parser = httptools.HttpResponseParser(Collect())
    parser.feed_data(data)
    return answers


async def echo(request: Request) -> Response:
    body = b"".join([chunk async for chunk in request.body.chunks()])
    return json_response({"method": request.method, "target": request.raw_path, "body": body.decode("latin-1")})


@asynccontextmanager
async def serving(handler: Handler = echo) -> AsyncIterator[tuple[HttpServer, Seen, int]]:
    seen = Seen()

    async def recording(request: Request) -> Response | StreamResponse:
        response = await handler(request)
        seen.requests.append((request.method, request.raw_path, b""))
        return response

    def on_error(method: str, target: str, status: int, exc: BaseException | None) -> Response:
        seen.refused.append((method, target, status, type(exc).__name__))
        return Response(status, body=b"refused", content_type="text/plain")

    server = HttpServer(recording, on_error)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.listen(sock, 16)
    try:
        yield server, seen, port
    finally:
        await server.shutdown(1.0)


async def talk(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `parts` (pausing between them), then read until the server closes: (bytes, closed by the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for part in parts:
        writer.write(part)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    data = b""
    closed = False
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
            closed = True
    except TimeoutError:
        pass
    writer.close()
    return data, closed


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def request(method: str, target: str, *headers: str, body: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\n{HOST}" + "".join(h + "\r\n" for h in headers) + "\r\n" + body).encode()


LAST = request("GET", "/last", "Connection: close")


# ----- framing ---------------------------------------------------------------------------------------------------

def test_pipelined_requests_are_answered_once_each_in_order_with_the_bodies_llhttp_framed() -> None:
    async def test() -> None:
        async with serving() as (_, seen, port):
            data, closed = await talk(port, request("POST", "/a", "Content-Length: 3", body="abc")
                                      + request("POST", "/b", "Transfer-Encoding: chunked",
                                                body="2;x=1\r\nde\r\n1\r\nf\r\n0\r\nAuthorization: x\r\n\r\n")
                                      + request("GET", "/c%2F?q=1") + LAST)
            answers = [json.loads(a.body) for a in parse_answers(data)]
            assert [(a["method"], a["target"], a["body"]) for a in answers] == [
                ("POST", "/a", "abc"), ("POST", "/b", "def"), ("GET", "/c%2F?q=1", ""), ("GET", "/last", "")]
            assert closed and seen.refused == []
    run(test)


@pytest.mark.parametrize("bad", [
    "GET /x\r\n\r\n",  # HTTP/0.9
    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "get /x HTTP/1.1\r\nHost: b\r\n\r\n",
    "GET /x HTTP/1.1\r\nHost: b\r\nHost: c\r\n\r\n",
    "GET /x HTTP/1.1\r\nContent-Type: a\r\nContent-Type: b\r\nHost: b\r\n\r\n",
    "GET /x HTTP/1.1\r\n\r\n",  # 1.1 without Host
    "GET /x HTTP/1.1\r\nHost: b\r\nX: a\r\n folded\r\n\r\n",
    # llhttp hands the connection over after an upgrade's head: its body would be read as a request.
    "POST /u HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nabcde",
    "CONNECT a:443 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /x HTTP/1.1\r\nHost: b\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "GET /" + "a" * 17000 + " HTTP/1.1\r\nHost: b\r\n\r\n",
    "GET /x HTTP/1.1\r\nHost: b\r\nX-Big: " + "a" * 17000 + "\r\n\r\n",
    "GET /x HTTP/1.1\r\nHost: b\r\n" + "".join(f"X-{n}: 1\r\n" for n in range(MAX_HEADERS + 1)) + "\r\n",
])
def test_a_refused_request_is_answered_in_its_turn_and_nothing_behind_it_is_read(bad: str) -> None:
    async def test() -> None:
        async with serving() as (_, seen, port):
            data, closed = await talk(port, request("GET", "/before") + bad.encode() + request("GET", "/after"))
            answers = parse_answers(data)
            assert [a.status for a in answers] == [200, 400] and closed
            assert [target for _, target, _ in seen.requests] == ["/before"]
            assert len(seen.refused) == 1 and seen.refused[0][2] == 400
    run(test)


def test_a_head_that_never_ends_is_refused_once_it_outgrows_the_limit() -> None:
    async def test() -> None:
        async with serving() as (_, seen, port):
            endless = b"GET /x HTTP/1.1\r\nHost: b\r\nX-Endless: " + b"a" * (MAX_HEAD + 65536)
            data, closed = await talk(port, endless, timeout=10)
            assert [a.status for a in parse_answers(data)] == [400] and closed
            assert seen.requests == [] and len(seen.refused) == 1
    run(test)


def test_http_1_0_without_host_is_spoken_and_closes_behind_its_answer() -> None:
    async def test() -> None:
        async with serving() as (_, seen, port):
            data, closed = await talk(port, b"GET /old HTTP/1.0\r\n\r\n" + request("GET", "/never"))
            assert [a.status for a in parse_answers(data)] == [200] and closed
            assert [target for _, target, _ in seen.requests] == ["/old"]
    run(test)


def test_a_body_refused_before_its_handler_started_takes_the_requests_place() -> None:
    async def test() -> None:
        async with serving() as (_, seen, port):
            bad = request("POST", "/smuggle", "Transfer-Encoding: chunked", body="4\r\nabcdef\r\n0\r\n\r\n")
            data, closed = await talk(port, bad + request("GET", "/after"))
            assert [a.status for a in parse_answers(data)] == [400] and closed
            assert seen.requests == [] and seen.refused[0][:3] == ("POST", "/smuggle", 400)
    run(test)


def test_a_body_that_breaks_while_its_handler_reads_it_fails_the_read_and_ends_the_connection() -> None:
    failures: list[str] = []

    async def reader(request: Request) -> Response:
        try:
            async for _ in request.body.chunks():
                pass
        except MalformedRequest as exc:
            failures.append(str(exc))
            return Response(400, body=b"bad body")
        return Response(200)

    async def test() -> None:
        async with serving(reader) as (_, seen, port):
            data, closed = await talk(port, request("POST", "/p", "Transfer-Encoding: chunked", body="2\r\nab\r\n"),
                                      b"zz\r\n" + request("GET", "/after"), pause=0.3)
            assert [a.status for a in parse_answers(data)] == [400] and closed
            assert len(failures) == 1 and seen.refused == []
    run(test)


def test_an_upgrade_is_an_ordinary_request_and_what_follows_is_the_next_one() -> None:
    async def test() -> None:
        async with serving() as (_, seen, port):
            data, closed = await talk(port, request("GET", "/ws", "Connection: Upgrade", "Upgrade: websocket")
                                      + LAST)
            assert [a.status for a in parse_answers(data)] == [200, 200] and closed
            assert [target for _, target, _ in seen.requests] == ["/ws", "/last"]
    run(test)


# ----- unread bodies and 100-continue ----------------------------------------------------------------------------

async def refuse_unread(request: Request) -> Response:
    return Response(403, body=b"no")


def test_an_unread_body_is_dropped_and_the_connection_stays_in_step() -> None:
    async def test() -> None:
        async with serving(refuse_unread) as (_, seen, port):
            data, closed = await talk(port, request("POST", "/a", "Content-Length: 10", body="01234"),
                                      b"56789" + LAST, pause=0.3)
            assert [a.status for a in parse_answers(data)] == [403, 403] and closed
            assert [target for _, target, _ in seen.requests] == ["/a", "/last"]
    run(test)


def test_an_unread_body_that_never_comes_ends_the_connection_after_the_linger() -> None:
    assert LINGER >= 1  # the wait below is the server's own bound, not a guess

    async def test() -> None:
        async with serving(refuse_unread) as (_, _seen, port):
            data, closed = await talk(port, request("POST", "/a", "Content-Length: 10", body="01"),
                                      timeout=LINGER + 5)
            assert [a.status for a in parse_answers(data)] == [403] and closed
    run(test)


def test_100_continue_is_sent_when_the_handler_reads_the_body_and_never_when_it_does_not() -> None:
    async def test() -> None:
        async with serving() as (_, _seen, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request("POST", "/e", "Expect: 100-continue", "Content-Length: 3"))
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"abc")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.close()
        async with serving(refuse_unread) as (_, _seen, port):
            data, closed = await talk(port, request("POST", "/e", "Expect: 100-continue", "Content-Length: 3"))
            assert b"100 Continue" not in data and [a.status for a in parse_answers(data)] == [403]
            assert closed  # the client was never told to send its body: only a close keeps both sides in step
    run(test)


# ----- answers ---------------------------------------------------------------------------------------------------

def streamed(length: int | None, parts: list[bytes], status: int = 200) -> Handler:
    async def handler(request: Request) -> StreamResponse:
        response = StreamResponse(status, headers=None)
        response.content_length = length
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        await response.write_eof()
        return response
    return handler


def test_a_stream_without_a_length_is_chunked_on_1_1_and_runs_to_the_close_on_1_0() -> None:
    async def test() -> None:
        async with serving(streamed(None, [b"ab", b"", b"cd"])) as (_, _seen, port):
            data, _ = await talk(port, request("GET", "/s") + LAST)
            answers = parse_answers(data)
            assert [(a.body, a.headers.get("transfer-encoding")) for a in answers] == [(b"abcd", "chunked")] * 2
            data, closed = await talk(port, b"GET /s HTTP/1.0\r\n\r\n")
            assert data.endswith(b"\r\n\r\nabcd") and b"Content-Length" not in data and closed
    run(test)


def test_a_stream_never_writes_past_its_length_and_a_short_one_ends_the_connection() -> None:
    async def test() -> None:
        async with serving(streamed(3, [b"ab", b"cdef"])) as (_, _seen, port):
            data, _ = await talk(port, request("GET", "/s") + LAST)
            assert [a.body for a in parse_answers(data)] == [b"abc", b"abc"]
        async with serving(streamed(10, [b"ab"])) as (_, _seen, port):
            data, closed = await talk(port, request("GET", "/s") + LAST)
            assert data.endswith(b"\r\n\r\nab") and closed  # the second request is never answered
    run(test)


def test_head_and_204_answers_carry_no_body() -> None:
    async def no_content(request: Request) -> Response:
        return Response(204 if request.raw_path == "/204" else 200, body=b"hidden")

    async def test() -> None:
        async with serving(no_content) as (_, _seen, port):
            data, _ = await talk(port, request("HEAD", "/h") + request("GET", "/204") + LAST)
            assert b"hidden" not in data.split(b"\r\n\r\n")[0] + data.split(b"\r\n\r\n")[1]
            assert data.count(b"hidden") == 1  # only the last GET's
            assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    run(test)


def test_a_header_with_a_line_break_never_reaches_the_wire() -> None:
    async def injecting(request: Request) -> Response:
        return Response(200, headers={"X-Evil": "a\r\nSet-Cookie: b"}, body=b"x")

    async def test() -> None:
        async with serving(injecting) as (_, seen, port):
            data, closed = await talk(port, request("GET", "/x") + request("GET", "/after"))
            assert b"Set-Cookie" not in data and [a.status for a in parse_answers(data)] == [500] and closed
            assert seen.refused == [("GET", "/x", 500, "ValueError")]
    run(test)


def test_a_handler_that_fails_gets_the_error_hooks_answer_and_the_connection_ends() -> None:
    async def failing(request: Request) -> Response:
        raise RuntimeError("bug")

    async def test() -> None:
        async with serving(failing) as (_, seen, port):
            data, closed = await talk(port, request("GET", "/x") + request("GET", "/after"))
            assert [a.status for a in parse_answers(data)] == [500] and closed
            assert seen.refused == [("GET", "/x", 500, "RuntimeError")]
    run(test)


# ----- back-pressure and shutdown --------------------------------------------------------------------------------

def test_reading_pauses_while_a_body_waits_for_its_handler() -> None:
    buffered: list[int] = []

    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.5)  # the client keeps sending meanwhile
        buffered.append(sum(len(c) for c in request.body._chunks))
        total = sum([len(chunk) async for chunk in request.body.chunks()])
        return Response(200, body=str(total).encode())

    async def test() -> None:
        size = 8 * 1024 * 1024
        async with serving(slow) as (_, _seen, port):
            data, _ = await talk(port, request("POST", "/big", f"Content-Length: {size}",
                                               "Connection: close") + b"x" * size, timeout=20)
            assert parse_answers(data)[0].body == str(size).encode()
            assert buffered[0] <= 2 * HIGH_WATER
    run(test)


def test_shutdown_closes_idle_connections_at_once_and_ends_a_busy_one_after_the_grace() -> None:
    async def test() -> None:
        begun = asyncio.Event()

        async def stuck(request: Request) -> Response:
            begun.set()
            await asyncio.sleep(60)
            return Response(200)

        async with serving(stuck) as (server, _seen, port):
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
            busy_writer.write(request("GET", "/stuck"))
            await asyncio.wait_for(begun.wait(), 5)
            loop = asyncio.get_running_loop()
            began = loop.time()
            await server.shutdown(0.3)
            assert loop.time() - began < 5
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""
            assert await asyncio.wait_for(busy_reader.read(), 5) == b""
            idle_writer.close()
            busy_writer.close()
    run(test)


@pytest.mark.parametrize(("method", "target", "expected"), [
    ("GET", "/v1/run", ("GET", "/v1/run")),
    ("GET", "/a%2Fb?x=1", ("GET", "/a%2Fb?x=1")),
    ("get", "/x", None),
    ("GET", "/a b", None),
    ("GET", "/" + "a" * 17000, None),
])
def test_parse_request_line_agrees_with_the_server(method: str, target: str,
                                                   expected: tuple[str, str] | None) -> None:
    assert parse_request_line(method, target) == expected
