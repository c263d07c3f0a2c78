"""The client a loop uses to call APIs through the outloop broker instead of holding keys.

Standard library only, so a loop in any virtualenv can vendor this one file.

Usage (inside ``outloop run -- python loop.py``, where ``OUTLOOP_SOCKET`` is set)::

    from outloop_cli.client import Outloop

    ol = Outloop()  # share one object across threads; each thread gets its own connection
    r = ol.request("crm", "GET", "/crm/v3/objects/contacts", params={"limit": "10"})
    if r.denied:
        print("refused:", r.error)
    else:
        contacts = r.json()

    chat = {"model": "gpt-4o-mini", "messages": messages, "stream": True}
    with ol.stream("openai", "POST", "/v1/chat/completions", json=chat) as s:
        for event in s.iter_sse():  # each event as soon as the API sends it
            print(event["data"])

From a shell: ``python -m outloop_cli.client GET crm /crm/v3/objects/contacts``.
"""

from __future__ import annotations

import argparse
import http.client
import json as jsonlib
import os
import re
import select
import socket
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

__all__ = ["Outloop", "OutloopClientError", "Response", "StreamingResponse"]

SOCKET_ENV = "OUTLOOP_SOCKET"

# A credential name becomes one path segment of the broker route; anything that could move the request to
# another route is refused here rather than left for the broker to misread.
_CREDENTIAL_RE = re.compile(r"[^/?#%\s]+")
# http.client would refuse these in the request line anyway; failing first gives the caller a clearer message.
_UNSENDABLE_RE = re.compile(r"[\x00-\x20\x7f-\U0010ffff]")


class OutloopClientError(Exception):
    """The broker could not be reached, or refused something the caller cannot go on without."""

    def __init__(self, message: str, *, response: Response | None = None) -> None:
        super().__init__(message)
        self.response = response


def _header_dict(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _is_denied(headers: Mapping[str, str]) -> bool:
    return headers.get("outloop-decision", "").strip().lower() == "deny"


@dataclass(frozen=True)
class Response:
    """A complete answer, read to the end so the connection is free for the next request."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def text(self) -> str:
        charset = "utf-8"
        for param in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key.lower() == "charset":
                charset = value.strip('"') or charset
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")

    @property
    def denied(self) -> bool:
        """True when the broker itself answered (policy, budget, upstream failure), not the upstream."""
        return _is_denied(self.headers)

    @property
    def error(self) -> dict[str, Any] | None:
        """When the broker refused: its ``{"type", "reason", "message", "credential", "rule"}`` object."""
        return _broker_error(self.headers, self.body)


def _broker_error(headers: Mapping[str, str], body: bytes) -> dict[str, Any] | None:
    """The inner object of the broker's ``{"error": {...}}`` body; None for an upstream's own answer."""
    if not _is_denied(headers):
        return None
    try:
        parsed = jsonlib.loads(body)
    except ValueError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


def _describe(resp: Response) -> str:
    error = resp.error
    if error is None:
        return f"HTTP {resp.status}"
    return f"{error.get('type', 'error')} ({error.get('reason', '?')}): {error.get('message', '')} (HTTP {resp.status})"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over the broker's Unix socket; the Host header is only a placeholder."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _broker_gone(conn: _UnixHTTPConnection) -> bool:
    # An idle keep-alive connection has nothing to read; if it is readable the broker closed it (EOF), so
    # reconnect now instead of sending a request into a dead socket.
    if conn.sock is None:
        return False
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


def _client_error(exc: BaseException, conn: _UnixHTTPConnection) -> OutloopClientError:
    path = conn.socket_path
    if isinstance(exc, FileNotFoundError):
        message = f"no broker socket at {path}: is this loop running under a live `outloop run`?"
    elif isinstance(exc, ConnectionRefusedError):
        message = f"the broker at {path} refused the connection: the run has probably ended"
    elif isinstance(exc, PermissionError):
        message = f"not permitted to connect to the broker at {path}"
    elif isinstance(exc, TimeoutError):
        message = f"the broker at {path} did not answer within {conn.timeout} s"
    else:
        message = f"talking to the broker at {path} failed: {type(exc).__name__}: {exc}"
    return OutloopClientError(message)


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/': {path!r}")
    if _UNSENDABLE_RE.search(path):
        raise ValueError(f"percent-encode whitespace, control and non-ASCII characters in the path: {path!r}")


def _check_credential(credential: str) -> None:
    if not _CREDENTIAL_RE.fullmatch(credential):
        raise ValueError(f"not a credential name: {credential!r}")


class StreamingResponse:
    """An answer whose body is read as it arrives, so SSE events reach the loop one by one.

    It owns its own connection, so other requests from the same thread can run while it is open.
    """

    def __init__(self, conn: _UnixHTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._resp = resp
        self.status: int = resp.status
        self.headers: dict[str, str] = _header_dict(resp.getheaders())

    @property
    def denied(self) -> bool:
        return _is_denied(self.headers)

    def read(self) -> bytes:
        """The rest of the body, e.g. to parse the broker's error JSON when ``denied``."""
        return b"".join(self.iter_chunks())

    def iter_chunks(self, size: int = 65536) -> Iterator[bytes]:
        while True:
            try:
                # read1 returns whatever has arrived (at most one chunk of a chunked body) instead of
                # waiting to fill `size`, which is what keeps streamed events from being held back.
                chunk = self._resp.read1(size)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise _client_error(exc, self._conn) from exc
            if not chunk:
                self.close()
                return
            yield chunk

    def iter_lines(self) -> Iterator[str]:
        """Lines without their ``\\n`` or ``\\r\\n``, each yielded as soon as it is complete."""
        pending = b""
        for chunk in self.iter_chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.removesuffix(b"\r").decode("utf-8", errors="replace")
        if pending:
            yield pending.removesuffix(b"\r").decode("utf-8", errors="replace")

    def iter_sse(self) -> Iterator[dict[str, str]]:
        """Server-sent events as ``{"event", "data", "id"}``; ``event`` defaults to ``message``."""
        data: list[str] = []
        event = ""
        last_id = ""
        for line in self.iter_lines():
            if not line:
                if data:
                    yield {"event": event or "message", "data": "\n".join(data), "id": last_id}
                data, event = [], ""
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                last_id = value

    def close(self) -> None:
        self._resp.close()
        self._conn.close()

    def __enter__(self) -> StreamingResponse:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Outloop:
    """A handle on the run's broker; safe to share between threads."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 60.0) -> None:
        path = socket_path if socket_path is not None else os.environ.get(SOCKET_ENV, "")
        if not path:
            raise OutloopClientError(
                f"{SOCKET_ENV} is not set: run the loop under `outloop run -- COMMAND`, "
                "or pass socket_path= to Outloop()"
            )
        self.socket_path = path
        self.timeout = timeout
        self._local = threading.local()
        # Every connection any thread opened, so close() can reach them all; weak, so a finished thread's
        # connection is freed with it.
        self._all: weakref.WeakSet[_UnixHTTPConnection] = weakref.WeakSet()
        self._lock = threading.Lock()

    def run_info(self) -> dict[str, Any]:
        """This run's id, workspace, credentials (rules, remaining budget) and limits."""
        resp = self._request("GET", "/v1/run", {}, None)
        if resp.status != 200:
            raise OutloopClientError(f"the broker refused run info: {_describe(resp)}", response=resp)
        info = resp.json()
        if not isinstance(info, dict):
            raise OutloopClientError("the broker's run info is not a JSON object", response=resp)
        return info

    def request(
        self,
        credential: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        json: Any = None,
    ) -> Response:
        """Call ``path`` on the credential's API; a policy refusal is a Response with ``denied`` set."""
        target, all_headers, payload = self._prepare(credential, path, params, headers, body, json)
        return self._request(method, target, all_headers, payload)

    def stream(
        self,
        credential: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        json: Any = None,
    ) -> StreamingResponse:
        """Like ``request``, but hands back the body as it arrives; close it (or use ``with``)."""
        target, all_headers, payload = self._prepare(credential, path, params, headers, body, json)
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, target, body=payload, headers=all_headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _client_error(exc, conn) from exc
        return StreamingResponse(conn, resp)

    def secret(self, credential: str) -> str:
        """The raw value, for non-HTTP use; only where the profile says ``reveal = true``, and audited."""
        _check_credential(credential)
        resp = self._request("GET", f"/v1/secret/{credential}", {}, None)
        if resp.status != 200:
            message = f"the broker refused secret {credential!r}: {_describe(resp)}"
            raise OutloopClientError(message, response=resp)
        return resp.text

    def close(self) -> None:
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            conn.close()

    def __enter__(self) -> Outloop:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _prepare(
        credential: str,
        path: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        headers: Mapping[str, str] | None,
        body: bytes | str | None,
        json: Any,
    ) -> tuple[str, dict[str, str], bytes | None]:
        _check_credential(credential)
        # The path goes out exactly as written: the broker refuses ambiguous paths, and "fixing" them here
        # would hide from the caller what was actually asked for.
        _check_path(path)
        target = f"/v1/http/{credential}{path}"
        if params:
            target += ("&" if "?" in path else "?") + urlencode(params)
        all_headers = dict(headers or {})
        if json is not None:
            if body is not None:
                raise ValueError("pass body= or json=, not both")
            body = jsonlib.dumps(json, separators=(",", ":"))
            if not any(name.lower() == "content-type" for name in all_headers):
                all_headers["Content-Type"] = "application/json"
        payload = body.encode("utf-8") if isinstance(body, str) else body
        return target, all_headers, payload

    def _connection(self) -> _UnixHTTPConnection:
        conn: _UnixHTTPConnection | None = getattr(self._local, "conn", None)
        # A forked child must not share its parent's socket, or the two would read each other's answers.
        if conn is None or self._local.pid != os.getpid():
            conn = _UnixHTTPConnection(self.socket_path, self.timeout)
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all.add(conn)
        return conn

    def _request(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> Response:
        conn = self._connection()
        if _broker_gone(conn):
            conn.close()
        reused = conn.sock is not None
        try:
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine):
                # The broker closed an idle keep-alive connection as we sent: it never saw the request, so
                # sending it once more on a fresh connection cannot duplicate it.
                conn.close()
                if not reused:
                    raise
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _client_error(exc, conn) from exc
        return Response(resp.status, _header_dict(resp.getheaders()), data)


def main(argv: Sequence[str] | None = None) -> int:
    """One call from a shell: body to stdout; exit 0 below HTTP 400, 1 from 400 up, 2 if it could not ask."""
    parser = argparse.ArgumentParser(prog="python -m outloop_cli.client", description=main.__doc__)
    parser.add_argument("method")
    parser.add_argument("credential")
    parser.add_argument("path", help="sent exactly as written, query string included")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("-d", "--data", help="request body; '-' reads it from stdin")
    args = parser.parse_args(argv)
    headers: dict[str, str] = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon:
            parser.error(f"a header is 'Name: value', not {header!r}")
        headers[name.strip()] = value.strip()
    data = sys.stdin.buffer.read() if args.data == "-" else None if args.data is None else args.data.encode()
    try:
        resp = Outloop().request(args.credential, args.method.upper(), args.path, headers=headers, body=data)
    except (OutloopClientError, ValueError) as exc:
        print(f"outloop client: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(resp.body)
    sys.stdout.flush()
    if resp.status >= 400:
        print(f"outloop client: {_describe(resp)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
