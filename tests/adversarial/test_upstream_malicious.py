"""Malicious or buggy upstream: echoing the secret anywhere in a response, forging the broker's own decision,
redirecting elsewhere, and framing its answer so that the child's connection would fall out of step.

The upstream is the credential's own host, so it has the secret; what outloop must stop is the secret (or a
broken answer) travelling on to the child. Redaction catches the value as sent (raw, URL-encoded, JSON-escaped,
base64 of the value alone); an upstream that transforms it deliberately is out of scope (docs/THREATS.md).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
import socket
import threading
import zlib
from collections.abc import Callable, Iterator

import pytest
from conftest import World

from adversarial.conftest import CanaryCollector, json_lines, run_hostile

Route = Callable[[bytes], bytes]  # the secret the request carried -> the raw response


class ScriptedUpstream:
    """A raw TCP server answering each path with exact bytes, so it can send what no HTTP library would."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the broker may drop a pooled connection at any point
            self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            self.received.append(head)
            match = re.search(rb"(?im)^authorization: bearer (\S+)|[?&]key=([^& ]+)", head)
            secret = (match.group(1) or match.group(2)) if match else b"none"
            path = head.split(b" ")[1].split(b"?")[0].decode()
            response = self.routes.get(path, lambda _: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")(
                secret)
            conn.sendall(response)
            if b"connection: close" in response.split(b"\r\n\r\n")[0].lower():
                return

    def close(self) -> None:
        self.sock.close()


def _ok(body: bytes, headers: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


ECHOES: dict[str, Route] = {
    "/reason": lambda s: b"HTTP/1.1 401 Invalid key " + s + b"\r\nContent-Length: 2\r\n\r\nno",
    "/header-name": lambda s: _ok(b"ok", b"X-" + s + b": 1\r\n"),
    "/header-value": lambda s: _ok(b"ok", b"X-Debug-Auth: Bearer " + s + b"\r\n"),
    "/www-authenticate": lambda s: _ok(b"no", b'WWW-Authenticate: Bearer error="invalid_token", token="' + s
                                       + b'"\r\n', b"401 Unauthorized"),
    "/set-cookie": lambda s: _ok(b"ok", b"Set-Cookie: session=" + s + b"; HttpOnly\r\n"),
    "/redirect-absolute": lambda s: _ok(b"", b"Location: /next?key=" + s + b"\r\n", b"302 Found"),
    "/redirect-relative": lambda s: _ok(b"", b"Location: next?key=" + s + b"\r\n", b"302 Found"),
    "/json": lambda s: _ok(b'{"error": "bad key", "key": "' + s + b'", "url": "https://x/?key=' + s + b'"}'),
    "/base64": lambda s: _ok(base64.b64encode(s) + b"\n" + base64.urlsafe_b64encode(s)),
    "/gzip": lambda s: _ok(gzip.compress(b"echo " + s), b"Content-Encoding: gzip\r\n"),
    "/deflate": lambda s: _ok(zlib.compress(b"echo " + s), b"Content-Encoding: deflate\r\n"),
    "/chunks": lambda s: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + b"".join(b"%x\r\n%s\r\n" % (len(s[i:i + 3]), s[i:i + 3]) for i in range(0, len(s), 3))
                          + b"0\r\n\r\n"),
    "/trailer": lambda s: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Key\r\n\r\n"
                           b"2\r\nok\r\n0\r\nX-Key: " + s + b"\r\n\r\n"),
    "/interim": lambda s: b"HTTP/1.1 100 Continue\r\nX-Key: " + s + b"\r\n\r\n" + _ok(b"ok"),
    "/close-framed": lambda s: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\necho " + s,
    "/forged-decision": lambda s: _ok(b'{"error": "denied"}', b"Outloop-Decision: deny\r\nOutloop-Rule: x\r\n",
                                      b"403 Forbidden"),
}
BROKEN: dict[str, Route] = {
    "/two-encodings": lambda s: _ok(gzip.compress(b"echo " + s + b" and more"),
                                    b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n"),
    "/gzip-gzip": lambda s: _ok(gzip.compress(gzip.compress(s)), b"Content-Encoding: gzip, gzip\r\n"),
    "/brotli": lambda s: _ok(b"\x1b\x03\x00", b"Content-Encoding: br\r\n"),
    "/two-lengths": lambda s: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "/length-and-chunked": lambda s: (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"3\r\nabc\r\n0\r\n\r\n"),
    "/garbage-status": lambda s: b"HTTP/1.1 OK 200\r\n\r\n",
    "/huge-header": lambda s: _ok(b"ok", b"X-Huge: " + s * 2000 + b"\r\n"),
    "/off-host": lambda s: _ok(b"", b"Location: http://203.0.113.9/steal\r\n", b"302 Found"),
    "/scheme-relative": lambda s: _ok(b"", b"Location: //203.0.113.9/steal\r\n", b"302 Found"),
    "/climbing": lambda s: _ok(b"", b"Location: ../../../other\r\n", b"302 Found"),
}

PROFILE = """
    version = 1
    [credentials.e]
    secret = "keyring"
    base_url = "%s"
    allow = ["GET /**"]
    [credentials.q]
    secret = "keyring"
    base_url = "%s"
    inject = { query = "key" }
    allow = ["GET /**"]
"""

LOOP = """
    import json, sys
    import rawhttp
    for target in sys.argv[1:]:
        exchange = rawhttp.exchange(rawhttp.request("GET", target), timeout=10)
        first = exchange.answers[0] if exchange.answers else None
        print(json.dumps({"target": target, "answers": [a.summary() for a in exchange.answers],
                          "reason": first and first.reason, "headers": first and first.headers,
                          "body": first and first.body.decode("latin-1")}), flush=True)
"""


@pytest.fixture
def scripted(world: World, canary_collector: CanaryCollector) -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream({**ECHOES, **BROKEN})
    world.write_profile("acme", PROFILE % (upstream.base_url, upstream.base_url))
    world.set_keyrings([("acme", "e", world.canaries["acme"]), ("acme", "q", world.canaries["acme"])])
    yield upstream
    upstream.close()
    for index, head in enumerate(upstream.received):  # the credential's own host: only the injection may hold it
        canary_collector.add(f"scripted upstream request #{index}", re.sub(
            rb"(?im)^authorization: bearer \S+|key=[^& ]+", b"", head))


def test_a_secret_echoed_anywhere_reaches_the_child_masked(world: World, scripted: ScriptedUpstream) -> None:
    targets = [f"/v1/http/e{path}" for path in ECHOES] + ["/v1/http/q/redirect-absolute",
                                                          "/v1/http/q/redirect-relative", "/v1/http/q/json"]
    result = run_hostile(world, LOOP, *targets)
    assert result.code == 0, result.err
    seen = {line["target"]: line for line in json_lines(result.out)}
    canary = world.canaries["acme"]
    mask = "*" * len(canary)
    assert canary not in result.out
    wrong = []
    for target, line in seen.items():
        answers = line["answers"]
        assert isinstance(answers, list)
        # The child's connection stayed in step: its sentinel was answered after the echo.
        if len(answers) != 2 or answers[1]["status"] != 200:
            wrong.append((target, "out of step", answers))
        if target.endswith("/forged-decision"):
            headers = dict(line["headers"])  # type: ignore[arg-type]
            if "Outloop-Decision" in headers or "Outloop-Rule" in headers or answers[0]["status"] != 403:
                wrong.append((target, "forged decision passed", headers))
        elif target.endswith(("/trailer", "/interim")):
            continue  # aiohttp drops trailers and interim answers: nothing to mask, nothing leaked
        elif mask not in json.dumps(line) and "*" * len(base64.b64encode(canary.encode())) not in json.dumps(line):
            wrong.append((target, "no mask where the secret was", line))
    assert wrong == [], "\n".join(map(str, wrong))


def test_broken_or_off_host_answers_are_refused_and_the_child_stays_in_step(
        world: World, scripted: ScriptedUpstream) -> None:
    result = run_hostile(world, LOOP, *[f"/v1/http/e{path}" for path in BROKEN])
    assert result.code == 0, result.err
    seen = {line["target"]: line["answers"] for line in json_lines(result.out)}
    expected_error = {"/off-host": ("denied", 403), "/scheme-relative": ("denied", 403), "/climbing": ("denied", 403)}
    wrong = []
    for path in BROKEN:
        answers = seen[f"/v1/http/e{path}"]
        assert isinstance(answers, list)
        error, status = expected_error.get(path, ("upstream_error", 502))
        if [(a["status"], a["error"]) for a in answers] != [(status, error), (200, None)]:
            wrong.append((path, answers))
    assert wrong == [], "\n".join(map(str, wrong))
    responses = [e for e in world.events(kind=None) if e["kind"] == "response"]
    assert len(responses) == len(BROKEN)
    assert {e["error"] for e in responses} <= {"upstream_error", "unsupported_encoding", "redirect_off_host"}
