"""Reference only: the least a Python proxy can do per request, to show what outloop's stack costs above it.

Raw asyncio protocols, one keep-alive upstream connection per client connection, the path prefix stripped
and `Authorization` replaced, the response relayed as it arrives. No policy, no redaction, no error handling
worth the name; with `--audit runlog` it commits each request through the real RunLog first, like the broker;
`--audit journal` prices an append-only, hash-chained journal written inline instead.
Serves a Unix socket; prints `{"socket": ..., "pid": ...}` when ready; stops on EOF on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CREDENTIAL, SECRET, run_loop_choice

PREFIX = f"/v1/http/{CREDENTIAL}".encode()
AUTH = b"Authorization: Bearer " + SECRET.encode()


class Upstream(asyncio.Protocol):
    def __init__(self, downstream: asyncio.Transport) -> None:
        self.downstream = downstream
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.left = -1  # body bytes still to relay; -1 while reading the head
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.left < 0:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            stop = head.find(b"\r\n", at + 2)
            self.left = int(head[at + 17: stop if stop > 0 else len(head)]) + end + 4
            data, self.buf = self.buf, b""
        self.downstream.write(data)
        self.left -= len(data)
        if self.left <= 0 and self.done is not None and not self.done.done():
            self.left = -1
            self.done.set_result(None)


class Downstream(asyncio.Protocol):
    def __init__(self, host: str, port: int, audit: Any) -> None:
        self.host, self.port, self.audit = host, port, audit
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.task = asyncio.ensure_future(self.pump())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            self.queue.put_nowait(head)

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        downstream = self.transport
        assert downstream is not None  # pump() starts from connection_made()
        _, self.upstream = await loop.create_connection(lambda: Upstream(downstream), self.host, self.port)
        seq = 0
        while True:
            head = await self.queue.get()
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.split(b" ", 2)
            headers = [h for h in rest.split(b"\r\n") if not h.lower().startswith((b"authorization:", b"host:"))]
            path = target[len(PREFIX):] if target.startswith(PREFIX) else target
            if self.audit is not None:
                seq = await self.audit.record_request_async(self.record(method, path))
            self.upstream.done = loop.create_future()
            self.upstream.transport.write(b"\r\n".join([method + b" " + path + b" " + version,  # type: ignore
                                                         f"Host: {self.host}:{self.port}".encode(), AUTH,
                                                         *headers]) + b"\r\n\r\n")
            await self.upstream.done
            if self.audit is not None:
                self.audit.record_response(self.response(seq))

    def record(self, method: bytes, path: bytes) -> Any:
        from outloop_cli.audit.writer import RequestRecord

        return RequestRecord(credential=CREDENTIAL, method=method.decode(), host=f"{self.host}:{self.port}",
                             path=path.decode().partition("?")[0], decision="allow", reason="allowed",
                             rule="GET /v1/**")

    def response(self, seq: int) -> Any:
        from outloop_cli.audit.writer import ResponseRecord

        return ResponseRecord(request_seq=seq, status=200, latency_ms=0.1, bytes_in=0, bytes_out=0)


class JournalAudit:
    """Prototype for pricing only: each event hash-chained and appended to a file with one write(2), inline.

    Survives the process being killed as well as WAL with synchronous=NORMAL does (the bytes are in the
    kernel when write returns); a background job would fold the journal into SQLite in large batches.
    """

    def __init__(self, path: Path) -> None:
        import hashlib

        self._sha256 = hashlib.sha256
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.head = "0" * 64
        self.seq = 0

    def _append(self, kind: str, fields: dict[str, Any]) -> int:
        import time

        row = {"seq": self.seq, "ts": round(time.time(), 6), "kind": kind, **fields}
        body = json.dumps(row, sort_keys=True, separators=(",", ":"))
        self.head = self._sha256((self.head + body).encode()).hexdigest()
        os.write(self.fd, f'{{"hash":"{self.head}","event":{body}}}\n'.encode())
        self.seq += 1
        return self.seq - 1

    async def record_request_async(self, rec: Any) -> int:
        return self._append("request", {k: v for k, v in rec.__dict__.items() if v is not None})

    def record_response(self, rec: Any) -> None:
        self._append("response", {k: v for k, v in rec.__dict__.items() if v is not None})

    def finish(self, **_: Any) -> None:
        os.close(self.fd)


async def serve(args: argparse.Namespace) -> None:
    audit: Any = None
    if args.audit == "journal":
        audit = JournalAudit(Path(args.dir) / "audit.journal")
    elif args.audit == "runlog":
        from outloop_cli.audit.writer import RunLog
        from outloop_cli.runner import new_run_id

        audit = RunLog.start(Path(args.dir) / "audit.db", run_id=new_run_id(), workspace="bench",
                             command=["rawproxy"], detail={})
    loop = asyncio.get_running_loop()
    path = str(Path(args.dir) / "raw.sock")
    server = await loop.create_unix_server(lambda: Downstream("127.0.0.1", args.upstream_port, audit), path,
                                           backlog=1024)
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    print(json.dumps({"socket": path, "pid": os.getpid()}), flush=True)
    await stop.wait()
    server.close()
    if audit is not None:
        audit.finish(exit_code=0, duration=0.0, detail={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--audit", choices=("none", "runlog", "journal"), default="none")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    run_loop_choice(serve(args), args.loop)


if __name__ == "__main__":
    main()
