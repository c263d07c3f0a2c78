"""The benches' load generator: closed-loop HTTP/1.1 keep-alive clients over TCP or a Unix socket.

A long-lived worker process driven by JSON lines on stdin (one answer line per command on stdout), so the
broker's peer check can be pointed at this one pid. Raw asyncio protocols (uvloop when installed) keep the
client's own cost per request small and identical for every target, so differences are the proxy's.

Commands:
  {"cmd": "load", "target": T, "request": STR, "clients": N, "duration": S, "warmup": S, "watch": PID|null}
  {"cmd": "probe", "target": T, "request": STR}          -> status and the first 300 bytes of the body
  {"cmd": "stream", "target": T, "request": STR}         -> status, body bytes, seconds
  {"cmd": "quit"}
T is {"unix": PATH} or {"host": H, "port": P}. `watch` is the proxy's pid: its CPU time is read exactly at
the window's start and end, and its RSS at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile


class ConnectionGone(Exception):
    pass


class Client(asyncio.Protocol):
    """One keep-alive connection; parses Content-Length and chunked responses, discarding the body."""

    def __init__(self, keep_body: int = 0) -> None:
        self.buf = bytearray()
        self.state = "head"
        self.left = 0
        self.status = 0
        self.body_bytes = 0
        self.keep_body = keep_body
        self.body = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionGone(str(exc)))

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        if self.closed:
            raise ConnectionGone("closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.body_bytes = 0
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._parse()

    def _take(self) -> None:
        take = min(self.left, len(self.buf))
        if take:
            if len(self.body) < self.keep_body:
                self.body += self.buf[: min(take, self.keep_body - len(self.body))]
            del self.buf[:take]
            self.left -= take
            self.body_bytes += take

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                if at >= 0:
                    stop = head.find(b"\r\n", at + 2)
                    self.left = int(head[at + 17: stop if stop > 0 else len(head)])
                    self.state = "body"
                elif b"\r\ntransfer-encoding: chunked" in head:
                    self.state = "size"
                else:
                    self.left = 0
                    self.state = "body"
            if self.state == "body":
                self._take()
                if self.left:
                    return
                self._done()
                continue
            if self.state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.left = size
                    self.state = "chunk"
            if self.state == "chunk":
                self._take()
                if self.left:
                    return
                self.state = "crlf"
            if self.state == "crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = "size"
                continue
            if self.state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._done()
                continue

    def _done(self) -> None:
        self.state = "head"
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.status)


async def connect(target: dict[str, Any], keep_body: int = 0) -> Client:
    loop = asyncio.get_running_loop()
    if "unix" in target:
        _, proto = await loop.create_unix_connection(lambda: Client(keep_body), target["unix"])
    else:
        _, proto = await loop.create_connection(lambda: Client(keep_body), target["host"], target["port"])
    return proto


def _cpu_seconds(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except Exception:
        return None


def _rss(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


async def load(cmd: dict[str, Any]) -> dict[str, Any]:
    target, request = cmd["target"], cmd["request"].encode("latin-1")
    clients, duration, warmup = int(cmd["clients"]), float(cmd["duration"]), float(cmd.get("warmup", 0.3))
    watch = cmd.get("watch")
    loop = asyncio.get_running_loop()
    conns = [await connect(target) for _ in range(clients)]
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = Counter[str]()
    cpu: dict[str, float | None] = {}
    loop.call_at(loop.time() + warmup, lambda: cpu.__setitem__("start", _cpu_seconds(watch)))

    async def one_client(index: int) -> None:
        conn = conns[index]
        while True:
            t0 = time.perf_counter()
            if t0 >= window_end:
                return
            try:
                status = await asyncio.wait_for(conn.send(request), 30)
            except (ConnectionGone, OSError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                with contextlib.suppress(Exception):
                    conn.transport.close()  # type: ignore[union-attr]
                conn = conns[index] = await connect(target)
                continue
            if t0 >= window_start:
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
            if conn.closed:
                conn = conns[index] = await connect(target)

    tasks = [asyncio.create_task(one_client(i)) for i in range(clients)]
    await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
    cpu["end"] = _cpu_seconds(watch)
    rss = _rss(watch)
    await asyncio.gather(*tasks)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    ok = statuses.get(200, 0)
    cpu_start, cpu_end = cpu.get("start"), cpu.get("end")
    cpu_used = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return {
        "requests": len(latencies),
        "ok": ok,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": (sum(latencies) / len(latencies) * 1000) if latencies else float("nan"),
        "proxy_cpu_s": cpu_used,
        "proxy_cpu_pct": (cpu_used / duration * 100) if cpu_used is not None else None,
        "proxy_cpu_us_per_req": (cpu_used / len(latencies) * 1e6) if cpu_used is not None and latencies else None,
        "proxy_rss": rss,
    }


async def probe(cmd: dict[str, Any]) -> dict[str, Any]:
    conn = await connect(cmd["target"], keep_body=300)
    try:
        status = await asyncio.wait_for(conn.send(cmd["request"].encode("latin-1")), 10)
        return {"status": status, "body": conn.body.decode("utf-8", "replace")}
    except (ConnectionGone, OSError, TimeoutError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if conn.transport is not None:
            conn.transport.close()


async def stream(cmd: dict[str, Any]) -> dict[str, Any]:
    conn = await connect(cmd["target"])
    started = time.perf_counter()
    try:
        status = await asyncio.wait_for(conn.send(cmd["request"].encode("latin-1")), 120)
    except (ConnectionGone, OSError, TimeoutError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}", "bytes": conn.body_bytes}
    finally:
        if conn.transport is not None:
            conn.transport.close()
    return {"status": status, "bytes": conn.body_bytes, "seconds": time.perf_counter() - started}


def main() -> None:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handlers = {"load": load, "probe": probe, "stream": stream}
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            answer = loop.run_until_complete(handlers[cmd["cmd"]](cmd))
        except Exception as exc:  # report, don't die: the orchestrator decides what a failure means
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    loop.close()


if __name__ == "__main__":
    main()
