"""A fast local upstream for the benches: raw asyncio (uvloop when installed), canned answers, keep-alive.

Run as its own process so it never shares a GIL with the proxy under test. Prints `{"port": N}` when ready.

Answers:
- `GET /big?bytes=N`: N bytes of JSON-ish filler with a Content-Length, written as fast as the peer reads.
- anything else: a small JSON body (about 190 bytes), like a CRM "get contact".
Requests that do not carry `Bearer <SECRET>` get a 401, so a 200 proves the proxy injected the credential.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SECRET, run_loop_choice

AUTH = b"Bearer " + SECRET.encode()
BODY = json.dumps({
    "id": "51", "properties": {"email": "ada@example.com", "firstname": "Ada", "lastname": "Lovelace",
                               "company": "Analytical Engines Ltd", "lifecyclestage": "lead"},
    "createdAt": "2024-01-01T00:00:00Z", "archived": False,
}).encode()
OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(BODY)).encode()
      + b"\r\nConnection: keep-alive\r\n\r\n" + BODY)
UNAUTHORISED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
FILLER = (b'{"event":"delta","text":"the quick brown fox jumps over the lazy dog"}\n' * 4096)[: 256 * 1024]


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.stream_left = 0
        self.skip_body = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.skip_body:
            taken = min(self.skip_body, len(data))
            self.skip_body -= taken
            data = data[taken:]
        self.buffer += data
        out = []
        while not self.stream_left:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            rest = self.buffer[end + 4:]
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17: stop if stop > 0 else len(lower)])
                taken = min(length, len(rest))
                rest = rest[taken:]
                self.skip_body = length - taken
            self.buffer = rest
            if AUTH not in head:
                out.append(UNAUTHORISED)
            elif head.startswith(b"GET /big"):
                self._start_stream(head, out)
            else:
                out.append(OK)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if self.stream_left:
                self._pump()

    def _start_stream(self, head: bytes, out: list[bytes]) -> None:
        line = head.split(b"\r\n", 1)[0]
        size = 100 * 1024 * 1024
        if b"bytes=" in line:
            size = int(line.split(b"bytes=", 1)[1].split(b" ", 1)[0].split(b"&", 1)[0])
        out.append(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: "
                   + str(size).encode() + b"\r\nConnection: keep-alive\r\n\r\n")
        self.stream_left = size

    def _pump(self) -> None:
        while self.stream_left and not self.paused and self.transport is not None:
            if self.transport.is_closing():
                self.stream_left = 0
                return
            chunk = FILLER if self.stream_left >= len(FILLER) else FILLER[: self.stream_left]
            self.transport.write(chunk)
            self.stream_left -= len(chunk)
        if not self.stream_left and self.buffer:
            self.data_received(b"")


async def serve(port: int, tls: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if tls:  # a PEM holding the certificate and its key: the egress proxy's bench needs an HTTPS upstream
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls)
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024, reuse_address=True, ssl=context)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": bound}), flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--tls", metavar="PEM", help="serve HTTPS with this certificate + key")
    args = parser.parse_args()
    run_loop_choice(serve(args.port, args.tls), args.loop)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
