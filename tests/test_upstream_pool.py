"""Spec for outloop_cli.broker.upstream_pool: the broker's keep-alive client against upstreams on real sockets.

Each upstream here is a raw asyncio server answering with exact bytes, so it can frame answers the way buggy or
hostile servers do. What matters is what the pool hands back, and whether it dares reuse the connection: it
must only when the previous response ended exactly where llhttp said it did.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from multidict import CIMultiDict
from yarl import URL

from outloop_cli.broker.upstream_pool import Timeouts, UpstreamError, UpstreamPool, UpstreamResponse

Answer = Callable[[bytes], bytes]  # the request head -> the exact bytes to send back
QUICK = Timeouts(connect=5, read=5)


def ok(body: bytes, headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


class Scripted:
    """Answers every request head with `answer(head)`; records heads, bodies and how many connections came."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()

    def drop_connections(self) -> None:
        """Close every connection from the server's side, with no chance for the client to notice first."""
        for writer in self.writers:
            writer.transport.abort()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                self.bodies.append(await _read_body(reader, head))
                writer.write(self.answer(head))
                await writer.drain()
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):  # the test is over
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                return body
            body += await reader.readexactly(size)
            await reader.readline()
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def run(test: Callable[[UpstreamPool], Awaitable[None]]) -> None:
    async def main() -> None:
        pool = UpstreamPool()
        try:
            await test(pool)
        finally:
            await pool.close()
    asyncio.run(main())


async def get(pool: UpstreamPool, base: str, path: str = "/", method: str = "GET",
              headers: CIMultiDict[str] | None = None, data: bytes | AsyncIterator[bytes] | None = None,
              timeout: Timeouts = QUICK) -> tuple[UpstreamResponse, bytes]:
    async with await pool.request(method, URL(base + path, encoded=True), headers=headers or CIMultiDict(),
                                  data=data, timeout=timeout) as response:
        return response, await response.read()


# ----- reuse --------------------------------------------------------------------------------------------------


def test_a_cleanly_ended_response_leaves_the_connection_for_the_next_request() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"hello")) as up:
            for _ in range(3):
                response, body = await get(pool, up.url)
                assert (response.status, body) == (200, b"hello")
            assert up.connections == 1
    run(test)


@pytest.mark.parametrize("answer", [
    ok(b"bye", b"Connection: close\r\n"),
    b"HTTP/1.1 200 OK\r\n\r\nto the close",  # framed by the close
    ok(b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo",  # a second, unasked-for response
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",  # HTTP/1.0 without keep-alive
], ids=["connection-close", "eof-framed", "extra-response", "http10"])
def test_any_doubt_about_where_a_response_ended_means_a_new_connection(answer: bytes) -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: answer, close_after=b"Content-Length" not in answer) as up:
            first, _ = await get(pool, up.url)
            second, _ = await get(pool, up.url)
            assert first.status == second.status == 200
            assert up.connections == 2
    run(test)


def test_a_body_left_unread_closes_the_connection() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"x" * 100_000)) as up:
            async with await pool.request("GET", URL(up.url + "/"), headers=CIMultiDict(), data=None,
                                          timeout=QUICK) as response:
                assert response.status == 200
            await get(pool, up.url)
            assert up.connections == 2
    run(test)


def test_a_head_request_is_answered_from_the_head_alone() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n") as up:
            response, body = await get(pool, up.url, method="HEAD")
            assert (response.status, response.content_length, body) == (200, 1000, b"")
            await get(pool, up.url, method="HEAD")
            assert up.connections == 2  # its parser still waits for the announced body: never reused
    run(test)


def test_a_pooled_connection_the_upstream_closed_is_retried_once_for_a_get_only() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"hi")) as up:
            await get(pool, up.url)
            up.drop_connections()  # its keep-alive timeout fires just as the next request goes out
            _, body = await get(pool, up.url)
            assert body == b"hi" and up.connections == 2
            up.drop_connections()
            with pytest.raises(UpstreamError):  # whether a POST was processed is unknown: never sent twice
                await get(pool, up.url, method="POST", data=b"once")
            assert up.connections == 2
    run(test)


# ----- framing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 OK 200\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-Many: aaaaaaaaaaaaaaaa\r\n" * 20_000 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + gzip.compress(b"a secret the redactor cannot see"),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ok(b"not gzip at all", b"Content-Encoding: gzip\r\n"),
    ok(gzip.compress(b",".join(b"%d" % i for i in range(5000)))[:200], b"Content-Encoding: gzip\r\n"),
], ids=["two-lengths", "length-and-chunked", "garbage-status", "long-header", "huge-head", "bad-chunk", "upgrade",
        "te-gzip", "te-gzip-chunked", "gzip-corrupt", "gzip-truncated"])
def test_a_response_llhttp_or_the_decoder_refuses_is_an_upstream_error(answer: bytes) -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: answer) as up:
            with pytest.raises(UpstreamError):
                await get(pool, up.url)
    run(test)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nshort\r\n",
], ids=["content-length", "chunked"])
def test_a_body_cut_short_by_the_close_is_an_error_not_a_short_answer(answer: bytes) -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: answer, close_after=True) as up:
            with pytest.raises(UpstreamError):
                await get(pool, up.url)
    run(test)


def test_chunks_interim_answers_and_trailers_reach_the_caller_as_one_body() -> None:
    answer = (b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
              b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
              b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: trailer\r\n\r\n")

    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: answer) as up:
            response, body = await get(pool, up.url)
            assert (response.status, body) == (201, b"abcde")
            assert "X-Interim" not in response.headers and "X-T" not in response.headers
            await get(pool, up.url)
            assert up.connections == 1
    run(test)


@pytest.mark.parametrize(("coding", "encoded"), [
    ("gzip", gzip.compress(b"plain text " * 100)),
    ("x-gzip", gzip.compress(b"plain text " * 50) + gzip.compress(b"plain text " * 50)),  # two members
    ("deflate", zlib.compress(b"plain text " * 100)),
    ("deflate", zlib.compress(b"plain text " * 100)[2:-4]),  # raw deflate, as some servers send it
])
def test_gzip_and_deflate_bodies_are_decoded(coding: str, encoded: bytes) -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(encoded, f"Content-Encoding: {coding}\r\n".encode())) as up:
            _, body = await get(pool, up.url)
            assert body == b"plain text " * 100
    run(test)


def test_a_compression_bomb_is_decoded_in_bounded_pieces() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))

    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(bomb, b"Content-Encoding: gzip\r\n")) as up:
            async with await pool.request("GET", URL(up.url), headers=CIMultiDict(), data=None,
                                          timeout=QUICK) as response:
                sizes = [len(piece) async for piece in response.iter_any()]
            assert sum(sizes) == 64 * 1024 * 1024 and max(sizes) <= 64 * 1024
    run(test)


# ----- what is sent -------------------------------------------------------------------------------------------


def test_the_request_head_carries_host_and_the_callers_headers_and_never_its_framing() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"")) as up:
            headers = CIMultiDict([("X-One", "1"), ("Transfer-Encoding", "chunked"), ("Host", "evil"),
                                   ("X-One", "2")])
            await get(pool, up.url, "/a%20b?q=1", method="DELETE", headers=headers)
            lines = up.heads[0].decode().split("\r\n")
            assert lines[0] == "DELETE /a%20b?q=1 HTTP/1.1"
            assert lines[1] == "Host: " + up.url.removeprefix("http://")
            assert lines[2:-2] == ["X-One: 1", "X-One: 2", "Content-Length: 0"]
    run(test)


@pytest.mark.parametrize(("name", "value"), [
    ("X-Split", "a\r\nX-Injected: 1"), ("X-Nul", "a\0b"), ("Bad Name", "v"), ("X-Lf", "a\nb"),
])
def test_a_header_that_would_break_the_framing_is_refused_before_anything_is_sent(name: str, value: str) -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"")) as up:
            with pytest.raises(UpstreamError, match="framing"):
                await get(pool, up.url, headers=CIMultiDict([(name, value)]))
            assert up.heads == []
    run(test)


async def _parts(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def test_a_streamed_body_goes_chunked_or_with_the_callers_length() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"")) as up:
            await get(pool, up.url, method="POST", data=_parts(b"ab", b"", b"cd"))
            await get(pool, up.url, method="POST", data=_parts(b"ab", b"cd"),
                      headers=CIMultiDict({"Content-Length": "4"}))
            assert b"transfer-encoding: chunked" in up.heads[0].lower()
            assert b"content-length: 4" in up.heads[1].lower() and b"transfer" not in up.heads[1].lower()
            assert up.bodies == [b"abcd", b"abcd"]
    run(test)


def test_a_streamed_body_longer_than_its_length_is_cut_and_the_connection_dropped() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"")) as up:
            with pytest.raises(UpstreamError, match="longer"):
                await get(pool, up.url, method="POST", data=_parts(b"abc", b"def"),
                          headers=CIMultiDict({"Content-Length": "4"}))
    run(test)


def test_an_error_reading_the_callers_body_reaches_the_caller_as_itself() -> None:
    class ChildWentAway(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"start"
        raise ChildWentAway

    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"")) as up:
            with pytest.raises(ChildWentAway):
                await get(pool, up.url, method="POST", data=failing())
    run(test)


# ----- time and connections -----------------------------------------------------------------------------------


def test_an_upstream_that_never_answers_times_out() -> None:
    async def test(pool: UpstreamPool) -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await get(pool, f"http://127.0.0.1:{port}", timeout=Timeouts(connect=5, read=0.3))
        assert asyncio.get_running_loop().time() - started < 3
        server.close()
    run(test)


def test_waiting_for_a_free_connection_counts_against_the_connect_timeout() -> None:
    async def test(_: UpstreamPool) -> None:
        pool = UpstreamPool(limit=1)
        async with Scripted(lambda head: ok(b"x" * 1_000_000)) as up:
            held = await pool.request("GET", URL(up.url), headers=CIMultiDict(), data=None, timeout=QUICK)
            with pytest.raises(TimeoutError):
                await get(pool, up.url, timeout=Timeouts(connect=0.2, read=5))
            held.release()
            response, _ = await get(pool, up.url)  # the slot came back
            assert response.status == 200
        await pool.close()
    run(test)


def test_an_unreachable_upstream_is_an_upstream_error() -> None:
    async def test(pool: UpstreamPool) -> None:
        with pytest.raises(UpstreamError, match="cannot connect"):
            await get(pool, "http://127.0.0.1:1")
    run(test)


def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_its_body() -> None:
    async def test(pool: UpstreamPool) -> None:
        async with Scripted(lambda head: ok(b"y" * (32 * 1024 * 1024))) as up:
            async with await pool.request("GET", URL(up.url), headers=CIMultiDict(), data=None,
                                          timeout=QUICK) as response:
                total = 0
                async for piece in response.iter_any():
                    assert len(piece) <= 2 * 1024 * 1024  # at most the high-water mark plus one socket read
                    total += len(piece)
                    await asyncio.sleep(0.001)
            assert total == 32 * 1024 * 1024
    run(test)


# ----- TLS ----------------------------------------------------------------------------------------------------


def _private_ca(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A CA and a leaf for 127.0.0.1; returns the server's context and the CA file a credential would name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outloop test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "up")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "leaf.pem")
    return server, tmp / "ca.pem"


def test_tls_is_verified_against_the_system_roots_or_the_credentials_own_ca(tmp_path: Path) -> None:
    server_tls, ca_file = _private_ca(tmp_path)

    async def test(pool: UpstreamPool) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(ok(b"secure"))
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
        url = URL(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        with pytest.raises(UpstreamError, match="cannot connect"):  # the system roots do not know this CA
            await pool.request("GET", url, headers=CIMultiDict(), data=None, timeout=QUICK)
        private = ssl.create_default_context()
        private.load_verify_locations(ca_file)
        for _ in range(2):
            async with await pool.request("GET", url, headers=CIMultiDict(), data=None, timeout=QUICK,
                                          ssl=private) as response:
                assert await response.read() == b"secure"
        server.close()
    run(test)
