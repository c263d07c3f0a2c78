"""A real HTTP upstream that records every byte it receives, for tests and the demo.

Tests prove what reached "the API" (the injected secret, the exact path) by reading its records.

In-process::

    with RecordingUpstream() as up:
        ...  # point a profile's base_url at up.base_url
        assert up.requests[0].path == "/crm/v3/objects/contacts?limit=10"

As a process: ``python tests/upstream.py --port 0 --print-port`` prints the port, then serves until killed.
Standard library only, so the demo can run it from any Python.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
MIB = 1024 * 1024
MAX_HANG_SECONDS = 300.0


@dataclass(frozen=True)
class Recorded:
    """One request as it arrived; ``raw`` is the bytes off the wire (request line, headers, framed body)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    ts: float
    raw: bytes = field(default=b"", repr=False)

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class _TeeReader:
    """Stands in for the handler's rfile so every byte read is also kept for ``all_bytes``."""

    def __init__(self, inner: io.BufferedIOBase, sink: Callable[[bytes], None]) -> None:
        self._inner = inner
        self._sink = sink

    def readline(self, limit: int = -1) -> bytes:
        data = self._inner.readline(limit)
        self._sink(data)
        return data

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self._sink(data)
        return data

    def close(self) -> None:
        self._inner.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Many brokers open their pooled connections at once under load; the default backlog of 5 would drop SYNs,
    # and the kernel's retries (1 s, 3 s, 7 s...) would show up as multi-second request latencies.
    request_queue_size = 128
    # Handler threads are not joined on close: a /hang request must not hold up stop().
    block_on_close = False

    def __init__(self, address: tuple[str, int], upstream: RecordingUpstream) -> None:
        self.upstream = upstream
        self.stopping = threading.Event()
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is routine here (timeouts, cancelled streams), not a failure.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, the body waits for the client's delayed ACK
    # (40 ms), so a sequential client would measure this server instead of the broker.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._raw = bytearray()
        self.rfile = _TeeReader(self.rfile, self._raw.extend)  # type: ignore[assignment]
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)
            self.server.upstream.connections += 1

    def finish(self) -> None:
        with self.server.sockets_lock:
            self.server.open_sockets.discard(self.connection)
        super().finish()

    def handle_one_request(self) -> None:
        self._raw.clear()
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: test output should show failures, not access logs."""

    def __getattr__(self, name: str) -> Any:
        # http.server dispatches to do_<METHOD>; every method, even an invented one, gets the same routes.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    # -- request side ------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers are read, to keep the connection in step, and ignored
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "bad request body framing")
            return
        self.server.upstream._record(
            Recorded(self.command, self.path, list(self.headers.items()), body, time.time(), bytes(self._raw))
        )
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        route = url.path
        try:
            if route == "/echo-headers":
                echoed: dict[str, str] = {}
                for name, value in self.headers.items():
                    echoed[name] = f"{echoed[name]}, {value}" if name in echoed else value
                self._send_json(200, echoed)
            elif route == "/echo-body":
                content_type = self.headers.get("Content-Type", "application/octet-stream")
                self._send(200, body, content_type)
            elif route == "/echo-auth-in-header":
                self._echo_auth()
            elif route == "/sse":
                self._sse(int(query.get("n", "5")), float(query.get("interval", "0.2")))
            elif route == "/redirect":
                self._send_json(302, {"redirect": True}, {"Location": query.get("to", "/")})
            elif route.startswith("/status/"):
                self._status(int(route.removeprefix("/status/")))
            elif route == "/hang":
                self._hang(float(query.get("seconds", "30")))
            elif route == "/big":
                self._big(float(query.get("mb", "1")))
            elif route == "/slow-body":
                self._slow_body(int(query.get("chunks", "5")), float(query.get("interval", "0.2")))
            else:
                # The path without its query: an injected query secret must not come back in the body.
                self._send_json(200, {"ok": True, "method": self.command, "path": route})
        except ValueError:
            self._send_json(400, {"error": "bad query parameter"})

    # -- response side -----------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", extra)

    def _start_chunked(self, status: int, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        # A zero-length chunk would end the body, so empty pieces are skipped rather than written.
        if data and self.command != "HEAD":
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_chunked(self) -> None:
        if self.command != "HEAD":
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _echo_auth(self) -> None:
        # The secret is cut into three chunks, flushed apart, so a redactor must handle chunk boundaries.
        auth = self.headers.get("Authorization", "")
        self._start_chunked(200, "text/plain", {"X-Echo": auth})
        third = -(-len(auth) // 3)
        for start in range(0, 3 * third, third or 1):
            self._chunk(auth[start : start + third].encode("latin-1"))
            time.sleep(0.05)
        self._end_chunked()

    def _sse(self, n: int, interval: float) -> None:
        self._start_chunked(200, "text/event-stream", {"Cache-Control": "no-cache"})
        for k in range(n):
            if k:
                self._sleep(interval)
            self._chunk(b'data: {"i": %d}\n\n' % k)
        self._end_chunked()

    def _status(self, code: int) -> None:
        if not 200 <= code <= 599:
            raise ValueError(code)
        if code in (204, 304):
            self.send_response(code)
            self.end_headers()
        else:
            self._send_json(code, {"status": code})

    def _hang(self, seconds: float) -> None:
        self._sleep(min(max(seconds, 0.0), MAX_HANG_SECONDS))
        self._send_json(200, {"ok": True, "slept": seconds})

    def _big(self, mb: float) -> None:
        total = int(mb * MIB)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(total))
        self.end_headers()
        if self.command == "HEAD":
            return
        block = bytes(range(256)) * (CHUNK // 256)
        sent = 0
        while sent < total:
            piece = block[: min(CHUNK, total - sent)]
            self.wfile.write(piece)
            sent += len(piece)

    def _slow_body(self, chunks: int, interval: float) -> None:
        self._start_chunked(200, "text/plain")
        for k in range(chunks):
            if k:
                self._sleep(interval)
            self._chunk(b"chunk %d\n" % k)
        self._end_chunked()

    def _sleep(self, seconds: float) -> None:
        # Wakes early when the server stops, so a slow route never outlives the test that started it.
        self.server.stopping.wait(seconds)


class RecordingUpstream:
    """A threaded HTTP/1.1 keep-alive server on 127.0.0.1 that keeps every request it was sent."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None,
                 name: str | None = None) -> None:
        """With `tls`, it serves HTTPS; `name` is the host its base_url uses (e.g. "localhost", which a
        certificate can name and a CA's name constraints can cover, unlike 127.0.0.1)."""
        self.requests: list[Recorded] = []
        self.connections = 0  # accepted, whether or not a request followed
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._server = _Server((host, port), self)
        if tls is not None:
            # The handshake happens on the first read, in the handler's thread, so a stalled client stalls
            # only itself, not the accept loop.
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.scheme = "https" if tls is not None else "http"
        self.host, self.port = host, self._server.server_address[1]
        self.name = name or host
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.name}:{self.port}"

    def start(self) -> RecordingUpstream:
        # A short poll interval keeps stop() (run after every test) from costing half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="upstream", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        # Idle keep-alive and streaming connections would otherwise linger in their handler threads.
        with self._server.sockets_lock:
            sockets = list(self._server.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> RecordingUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _record(self, rec: Recorded) -> None:
        with self._arrived:
            self.requests.append(rec)
            self._arrived.notify_all()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until ``n`` requests have arrived; raises TimeoutError naming how many did."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= n, timeout):
                raise TimeoutError(
                    f"expected {n} upstream requests within {timeout} s, got {len(self.requests)}"
                )
            return list(self.requests)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no client connection is open: every request already on the wire has been recorded.

        After a client dies, what it sent before dying is still read and recorded; this waits for that.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._server.sockets_lock:
                if not self._server.open_sockets:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"upstream connections still open after {timeout} s")
            self._server.stopping.wait(0.01)

    def all_bytes(self) -> bytes:
        """Everything received, for canary scans: the raw wire bytes, then each de-chunked body.

        Bodies are added de-chunked too, so a secret split by chunk framing is still found.
        """
        with self._lock:
            return b"".join(r.raw for r in self.requests) + b"".join(r.body for r in self.requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the recording test upstream until killed.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--print-port", action="store_true", help="print the port as the first stdout line")
    args = parser.parse_args(argv)
    # SIGTERM (how the demo stops it) becomes an ordinary exit, so the server is closed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with RecordingUpstream(args.host, args.port) as upstream:
        if args.print_port:
            print(upstream.port, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
