"""The stdlib client loops vendor: exact paths, broker errors, streaming, threads, reconnects.

It runs against a small fake broker on a real Unix socket, so the bytes on the wire are what is checked.
"""

from __future__ import annotations

import http.server
import itertools
import json
import shutil
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from operator_support import wait_for

from outloop_cli.client import Outloop, OutloopClientError, main

DENY = {"type": "denied", "reason": "no_matching_rule", "message": "no rule allows DELETE", "credential": "crm",
        "rule": None}
# Edge cases of the SSE format, cut mid-line so the parser must buffer across reads.
TRICKY_SSE = [
    b": keep-alive comment\n\nevent: delta\nid: 7\nda",
    b"ta: line one\ndata:line two\r\n\r",
    b"\ndata: no event name\n\nretry: 10\n\ndata: unterminated",
]


@dataclass
class Seen:
    targets: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeBroker(http.server.BaseHTTPRequestHandler):
    """Just enough of the broker's routes to exercise the client."""

    protocol_version = "HTTP/1.1"
    seen: Seen

    def setup(self) -> None:
        super().setup()
        with self.seen.lock:
            self.seen.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self.handle_any()

    do_POST = do_PUT = do_DELETE = do_GET

    def handle_any(self) -> None:
        if getattr(self, "drop_this", False):
            # Hang up on a request unanswered, as a broker closing an idle connection just as it arrives.
            self.close_connection = True
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.seen.lock:
            self.seen.targets.append(self.path)
            self.seen.requests.append(
                {"method": self.command, "body": body, "content_type": self.headers.get("Content-Type")}
            )
        route = urlsplit(self.path).path
        if route == "/v1/run":
            self.reply(200, b'{"run_id": "01RUN", "workspace": "acme"}')
        elif route == "/v1/secret/open":
            self.reply(200, b"s3cret value", content_type="text/plain; charset=utf-8")
        elif route.startswith(("/v1/http/crm/deny", "/v1/secret/")):
            self.reply(403, json.dumps({"error": DENY}).encode(), deny=True)
        elif route == "/v1/http/llm/stream":
            interval = float(parse_qs(urlsplit(self.path).query)["interval"][0])
            self.chunked([b'data: {"i": %d}\n\n' % k for k in range(5)], interval)
        elif route == "/v1/http/llm/tricky":
            self.chunked(TRICKY_SSE, 0.01)
        else:
            self.reply(200, b'{"ok": true}')
            # Close without saying so, as a broker dropping an idle keep-alive connection would.
            self.close_connection = route == "/v1/http/crm/then-drop"
            self.drop_this = route == "/v1/http/crm/drop-next"

    def reply(
        self, status: int, body: bytes, *, deny: bool = False, content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Dup", "a")
        self.send_header("X-Dup", "b")
        if deny:
            self.send_header("Outloop-Decision", "deny")
        self.end_headers()
        self.wfile.write(body)

    def chunked(self, pieces: list[bytes], interval: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for k, piece in enumerate(pieces):
            if k:
                time.sleep(interval)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 64  # socketserver's 5 overflows when 8 client threads connect at once (EAGAIN)
    block_on_close = False
    seen: Seen

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self.seen.lock:
            self.seen.closed += 1


@pytest.fixture
def broker() -> Iterator[tuple[str, Seen]]:
    # Unix socket paths are capped near 107 bytes, so not pytest's long tmp_path.
    tmp = tempfile.mkdtemp(dir="/tmp", prefix="olc")
    path = str(Path(tmp) / "broker.sock")
    seen = Seen()
    server = Server(path, type("Handler", (FakeBroker,), {"seen": seen}))
    server.seen = seen
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield path, seen
    server.shutdown()
    server.server_close()
    shutil.rmtree(tmp)


@pytest.fixture
def client(broker: tuple[str, Seen]) -> Iterator[Outloop]:
    with Outloop(broker[0], timeout=5) as ol:
        yield ol


@pytest.mark.parametrize("path", ["/a/../b", "/a%2Fb", "/x//y/./z?q=%2F", "/a\\b"])
def test_path_is_sent_exactly_as_given(client: Outloop, broker: tuple[str, Seen], path: str) -> None:
    assert client.request("crm", "GET", path).status == 200
    assert broker[1].targets == ["/v1/http/crm" + path]


def test_params_are_urlencoded_and_appended(client: Outloop, broker: tuple[str, Seen]) -> None:
    client.request("crm", "GET", "/search", params={"q": "a b&c=/", "limit": "10"})
    client.request("crm", "GET", "/search?x=1", params=[("tag", "a"), ("tag", "b")])
    assert broker[1].targets == [
        "/v1/http/crm/search?q=a+b%26c%3D%2F&limit=10",
        "/v1/http/crm/search?x=1&tag=a&tag=b",
    ]


def test_json_body_is_compact_and_typed_unless_the_caller_typed_it(
    client: Outloop, broker: tuple[str, Seen]
) -> None:
    client.request("crm", "POST", "/c", json={"name": "Zoë", "n": [1, 2]})
    client.request("crm", "PUT", "/c", json=[1], headers={"content-type": "application/merge-patch+json"})
    client.request("crm", "POST", "/c", body="plain")
    got = [(r["body"], r["content_type"]) for r in broker[1].requests]
    assert got == [
        (b'{"name":"Zo\\u00eb","n":[1,2]}', "application/json"),
        (b"[1]", "application/merge-patch+json"),
        (b"plain", None),
    ]


def test_response_headers_are_lowercased_and_duplicates_joined(client: Outloop) -> None:
    resp = client.request("crm", "GET", "/x")
    assert (resp.headers["x-dup"], resp.json(), resp.denied, resp.error) == (
        "a, b",
        {"ok": True},
        False,
        None,
    )


def test_denied_response_exposes_the_broker_error(client: Outloop) -> None:
    resp = client.request("crm", "DELETE", "/deny/1")
    assert (resp.status, resp.denied, resp.error) == (403, True, DENY)


def test_run_info_and_secret(client: Outloop) -> None:
    assert client.run_info() == {"run_id": "01RUN", "workspace": "acme"}
    assert client.secret("open") == "s3cret value"


def test_refused_secret_raises_with_the_broker_message(client: Outloop) -> None:
    with pytest.raises(OutloopClientError, match="no rule allows DELETE") as info:
        client.secret("closed")
    assert info.value.response is not None and info.value.response.status == 403


def test_stream_yields_each_event_as_it_arrives(client: Outloop, broker: tuple[str, Seen]) -> None:
    with client.stream("llm", "POST", "/stream", params={"interval": "0.2"}, json={"stream": True}) as s:
        assert (s.status, s.headers["content-type"]) == (200, "text/event-stream")
        arrivals, chunks = [], []
        for chunk in s.iter_chunks():
            arrivals.append(time.monotonic())
            chunks.append(chunk)
            # The stream has its own connection, so the same thread can make other calls meanwhile.
            assert client.request("crm", "GET", "/meanwhile").status == 200
    assert chunks == [b'data: {"i": %d}\n\n' % k for k in range(5)]
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(arrivals))


def test_iter_sse_parses_events(client: Outloop) -> None:
    with client.stream("llm", "GET", "/stream", params={"interval": "0"}) as s:
        assert [json.loads(e["data"])["i"] for e in s.iter_sse()] == [0, 1, 2, 3, 4]
    with client.stream("llm", "GET", "/tricky") as s:
        assert list(s.iter_sse()) == [
            {"event": "delta", "data": "line one\nline two", "id": "7"},
            {"event": "message", "data": "no event name", "id": "7"},
        ]


def test_one_client_shared_by_8_threads(client: Outloop, broker: tuple[str, Seen]) -> None:
    def work(t: int) -> list[int]:
        return [client.request("crm", "GET", f"/t{t}/{i}").status for i in range(50)]

    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda t=t: results.update({t: work(t)})) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {t: [200] * 50 for t in range(8)}
    assert sorted(broker[1].targets) == sorted(f"/v1/http/crm/t{t}/{i}" for t in range(8) for i in range(50))
    assert broker[1].connections == 8  # one keep-alive connection per thread, reused


def test_reconnects_when_the_broker_closed_an_idle_connection(
    client: Outloop, broker: tuple[str, Seen]
) -> None:
    assert client.request("crm", "GET", "/then-drop").status == 200
    wait_for(lambda: broker[1].closed == 1)  # the broker has hung up before the next request goes out
    assert client.request("crm", "POST", "/next", body=b"x").status == 200
    assert broker[1].targets == ["/v1/http/crm/then-drop", "/v1/http/crm/next"]
    assert broker[1].connections == 2


def test_resends_once_when_the_broker_hung_up_as_the_request_went_out(
    client: Outloop, broker: tuple[str, Seen]
) -> None:
    assert client.request("crm", "GET", "/drop-next").status == 200
    assert client.request("crm", "POST", "/next", body=b"x").status == 200
    assert broker[1].targets == ["/v1/http/crm/drop-next", "/v1/http/crm/next"]
    assert broker[1].connections == 2


def test_missing_socket_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUTLOOP_SOCKET", raising=False)
    with pytest.raises(OutloopClientError, match=r"OUTLOOP_SOCKET is not set.*outloop run"):
        Outloop()


def test_absent_socket_is_a_clear_error() -> None:
    with pytest.raises(OutloopClientError, match="no broker socket at /tmp/olc-none/s"):
        Outloop("/tmp/olc-none/s").request("crm", "GET", "/x")


@pytest.mark.parametrize(
    ("credential", "path"), [("crm", "no-slash"), ("crm", "/a b"), ("crm", "/é"), ("a/b", "/x"), ("", "/x")]
)
def test_unsendable_credential_or_path_is_refused_before_sending(
    client: Outloop, credential: str, path: str
) -> None:
    with pytest.raises(ValueError):
        client.request(credential, "GET", path)


def test_cli_prints_body_and_exits_by_status(
    broker: tuple[str, Seen], monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setenv("OUTLOOP_SOCKET", broker[0])
    assert main(["post", "crm", "/x?y=1", "-H", "Content-Type: text/plain", "-d", "hi"]) == 0
    assert capsysbinary.readouterr().out == b'{"ok": true}'
    assert broker[1].requests[-1] == {"method": "POST", "body": b"hi", "content_type": "text/plain"}
    assert main(["DELETE", "crm", "/deny/1"]) == 1
    assert b"denied (no_matching_rule): no rule allows DELETE (HTTP 403)" in capsysbinary.readouterr().err
