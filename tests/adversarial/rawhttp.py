"""Raw HTTP/1.1 over the broker's Unix socket, for hostile loops: no client library tidies the attack up first.

Standard library only: tests copy this file next to the loop script, which imports it inside `outloop run`.
Every byte the broker sends back is also appended to a `wire-*.log` in the working directory (one per thread, so
a response is never interleaved with another), and the session's canary collector sees exactly what the child saw.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

# Sent after an attack on the same connection: its answer (or its absence) shows how many requests the
# broker read out of the attack's bytes, without waiting for an idle timeout.
SENTINEL = b"GET /v1/run HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n"


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    def error(self) -> str | None:
        """The broker's error code when the broker itself answered (Outloop-Decision: deny)."""
        if (self.header("outloop-decision") or "").lower() != "deny" or not self.body:
            return None  # the upstream's answer, or a HEAD answer (no body to carry the code)
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return "unparsable-error-body"
        error = parsed.get("error") if isinstance(parsed, dict) else None
        return str(error.get("type")) if isinstance(error, dict) else "unparsable-error-body"

    def summary(self) -> dict[str, object]:
        return {"status": self.status, "error": self.error(), "decision": self.header("outloop-decision")}


@dataclass
class Exchange:
    answers: list[Answer] = field(default_factory=list)
    closed: bool = False  # the broker closed the connection
    leftover: bytes = b""  # bytes that did not form a complete response

    def summary(self) -> dict[str, object]:
        return {"answers": [a.summary() for a in self.answers], "closed": self.closed,
                "leftover": len(self.leftover)}


def connect(path: str | None = None, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path or os.environ["OUTLOOP_SOCKET"])
    return sock


def _log(data: bytes) -> None:
    if data:
        with open(f"wire-{os.getpid()}-{threading.get_native_id()}.log", "ab") as handle:
            handle.write(data)


def parse_one(data: bytes, *, head_request: bool = False, at_eof: bool = False) -> tuple[Answer, bytes] | None:
    """One complete response from the front of `data`, or None when more bytes are needed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])]
    rest = data[end + 4:]
    lookup = {name.lower(): value for name, value in headers}
    code = int(status)
    if head_request or code in (204, 304) or 100 <= code < 200:
        return Answer(code, reason, headers, b""), rest
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        body = b""
        while True:
            line_end = rest.find(b"\r\n")
            if line_end < 0:
                return None
            size = int(rest[:line_end].split(b";")[0], 16)
            if len(rest) < line_end + 2 + size + 2:
                return None
            body += rest[line_end + 2:line_end + 2 + size]
            rest = rest[line_end + 2 + size + 2:]
            if size == 0:
                return Answer(code, reason, headers, body), rest
    if "content-length" in lookup:
        length = int(lookup["content-length"])
        if len(rest) < length:
            return None
        return Answer(code, reason, headers, rest[:length]), rest[length:]
    return (Answer(code, reason, headers, rest), b"") if at_eof else None  # body framed by the close


def read_answers(sock: socket.socket, result: Exchange, *, timeout: float, want: int | None = None,
                 head: bool = False) -> None:
    """Read until the broker closes (or `want` answers arrived, or `timeout`), parsing answers as they come."""
    buffer = result.leftover
    deadline = time.monotonic() + timeout
    while want is None or len(result.answers) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except TimeoutError:
            break
        _log(chunk)
        if not chunk:
            result.closed = True
        buffer += chunk
        while buffer:
            parsed = parse_one(buffer, head_request=head and not result.answers, at_eof=result.closed)
            if parsed is None:
                break
            answer, buffer = parsed
            result.answers.append(answer)
        if result.closed:
            break
    result.leftover = buffer


def exchange(payload: bytes | list[bytes], *, sock: socket.socket | None = None, gap: float = 0.0,
             timeout: float = 10.0, head: bool = False, sentinel: bool = True) -> Exchange:
    """Send the attack (pieces `gap` seconds apart), then the sentinel, and read until the broker closes.

    The sentinel asks for `Connection: close`, so a broker that stayed in step answers it and hangs up; a
    broker that gave up on the attack hangs up earlier. Either way no idle timeout is needed.
    """
    own = sock is None
    sock = sock or connect(timeout=timeout)
    pieces = payload if isinstance(payload, list) else [payload]
    result = Exchange()
    try:
        for index, piece in enumerate(pieces):
            if index and gap:
                time.sleep(gap)
            sock.sendall(piece)
        if sentinel:
            sock.sendall(SENTINEL)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the broker hung up mid-attack: what it sent before that is still readable
    read_answers(sock, result, timeout=timeout, head=head)
    if own:
        sock.close()
    return result


def request(method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
            version: str = "HTTP/1.1") -> bytes:
    """A well-formed request, unless the caller's pieces make it otherwise (that is the point)."""
    lines = [f"{method} {target} {version}", "Host: broker"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers or []):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
