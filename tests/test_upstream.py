"""The recording upstream behaves as the broker tests and the demo assume.

If this fixture lied (lost a header, re-chunked a stream), every broker test built on it would too.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from upstream import RecordingUpstream


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as up:
        yield up


def connect(up: RecordingUpstream) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", up.port, timeout=5)


def test_default_route_records_raw_path_and_does_not_echo_query(upstream: RecordingUpstream) -> None:
    conn = connect(upstream)
    conn.request("GET", "/a/../b%2Fc?key=canary123", headers={"X-Custom": "v"})
    resp = conn.getresponse()
    assert json.loads(resp.read()) == {"ok": True, "method": "GET", "path": "/a/../b%2Fc"}
    rec = upstream.wait_for(1)[0]
    assert (rec.method, rec.path, rec.header("x-custom")) == ("GET", "/a/../b%2Fc?key=canary123", "v")
    assert b"GET /a/../b%2Fc?key=canary123 HTTP/1.1\r\n" in upstream.all_bytes()


def test_keep_alive_connection_serves_many_requests_and_any_method(upstream: RecordingUpstream) -> None:
    conn = connect(upstream)
    for method in ("GET", "POST", "PATCH", "PROPFIND"):
        conn.request(method, "/x", body=b"" if method != "GET" else None)
        assert json.loads(conn.getresponse().read())["method"] == method
    assert [r.method for r in upstream.wait_for(4)] == ["GET", "POST", "PATCH", "PROPFIND"]


def test_chunked_and_sized_request_bodies_are_decoded(upstream: RecordingUpstream) -> None:
    conn = connect(upstream)
    conn.request("POST", "/echo-body", body=iter([b"hello ", b"chun", b"ked"]), encode_chunked=True)
    assert conn.getresponse().read() == b"hello chunked"
    conn.request("PUT", "/echo-body", body=b"sized", headers={"Content-Type": "text/plain"})
    resp = conn.getresponse()
    assert (resp.read(), resp.getheader("Content-Type")) == (b"sized", "text/plain")
    assert [r.body for r in upstream.requests] == [b"hello chunked", b"sized"]
    assert b"sized" in upstream.all_bytes() and b"chun" in upstream.all_bytes()


def test_echo_headers_returns_request_headers(upstream: RecordingUpstream) -> None:
    conn = connect(upstream)
    conn.request("GET", "/echo-headers", headers={"Authorization": "Bearer canary"})
    assert json.loads(conn.getresponse().read())["Authorization"] == "Bearer canary"


def test_echo_auth_splits_the_value_across_three_chunks(upstream: RecordingUpstream) -> None:
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        sock.sendall(b"GET /echo-auth-in-header HTTP/1.1\r\nAuthorization: Bearer abcdefghi\r\n\r\n")
        raw = b""
        while not raw.endswith(b"0\r\n\r\n"):
            raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"X-Echo: Bearer abcdefghi" in head and b"Transfer-Encoding: chunked" in head
    assert body == b"6\r\nBearer\r\n6\r\n abcde\r\n4\r\nfghi\r\n0\r\n\r\n"


def test_sse_events_arrive_spaced_by_interval(upstream: RecordingUpstream) -> None:
    conn = connect(upstream)
    conn.request("GET", "/sse?n=3&interval=0.1")
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream"
    arrivals, chunks = [], []
    while chunk := resp.read1(65536):
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    assert chunks == [b'data: {"i": %d}\n\n' % k for k in range(3)]
    assert all(later - earlier >= 0.08 for earlier, later in itertools.pairwise(arrivals))


def test_redirect_status_big_and_slow_body(upstream: RecordingUpstream) -> None:
    conn = connect(upstream)
    conn.request("GET", "/redirect?to=https://elsewhere.example/x")
    resp = conn.getresponse()
    resp.read()
    assert (resp.status, resp.getheader("Location")) == (302, "https://elsewhere.example/x")
    conn.request("GET", "/status/429")
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (429, {"status": 429})
    conn.request("GET", "/big?mb=2")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == str(2 * 1024 * 1024) and len(resp.read()) == 2 * 1024 * 1024
    conn.request("GET", "/slow-body?chunks=3&interval=0.01")
    assert conn.getresponse().read() == b"chunk 0\nchunk 1\nchunk 2\n"


def test_stop_does_not_wait_for_a_hanging_request() -> None:
    up = RecordingUpstream().start()
    conn = connect(up)
    conn.request("GET", "/hang?seconds=30")
    up.wait_for(1)
    started = time.monotonic()
    up.stop()
    assert time.monotonic() - started < 2


def test_script_prints_its_port_and_serves() -> None:
    script = Path(__file__).with_name("upstream.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--print-port"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/status/201")
        assert conn.getresponse().status == 201
    finally:
        proc.terminate()
        assert proc.wait(5) == 0
