"""Acceptance 4 and the broken-peer cases: streams pass event by event, and broken peers get clean answers."""

from __future__ import annotations

import itertools
import json
import threading

from conftest import World
from operator_support import wait_for


def test_sse_events_reach_the_child_as_separate_reads(world: World) -> None:
    result = world.run_loop("""
        import json, time
        from outloop_cli.client import Outloop
        stream = Outloop().stream("crm", "GET", "/sse?n=5&interval=0.2")
        reads = []
        for chunk in stream.iter_chunks():
            reads.append((time.monotonic(), chunk.decode()))
        print(json.dumps(reads))
    """)
    assert result.code == 0, result.err
    reads = json.loads(result.out)
    assert len(reads) == 5, reads
    for index, (_, text) in enumerate(reads):
        assert text == 'data: {"i": ' + str(index) + '}\n\n'
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reads)]
    assert min(gaps) > 0.1, gaps


def test_upstream_that_hangs_gets_504_and_an_audited_outcome(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        read_timeout = "1s"
        allow = ["GET /hang"]
    """)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("crm", "GET", "/hang?seconds=10")
        print(response.status, response.error["type"])
    """)
    assert result.out.split() == ["504", "upstream_timeout"], result.err
    (response_event,) = world.events(kind="response")
    assert response_event["status"] == 504
    assert "Traceback" not in result.err


def test_unreachable_upstream_is_502(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "http://127.0.0.1:9"
        connect_timeout = "2s"
        allow = ["GET /x"]
    """)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("crm", "GET", "/x")
        print(response.status, response.error["type"])
    """)
    assert result.out.split() == ["502", "upstream_error"], result.err


def test_child_closing_mid_stream_is_audited_and_the_run_goes_on(world: World) -> None:
    go, results = world.work / "go", []
    runner = threading.Thread(target=lambda: results.append(world.run_loop(f"""
        import socket, os, time
        from outloop_cli.client import Outloop
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(os.environ["OUTLOOP_SOCKET"])
        sock.sendall(b"GET /v1/http/crm/slow-body?chunks=20&interval=0.1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        sock.recv(100)
        sock.close()
        while not os.path.exists({str(go)!r}):  # until the broker has audited the disconnect
            time.sleep(0.01)
        print(Outloop().request("crm", "GET", "/crm/v3/objects/contacts").status)
    """)))
    runner.start()
    wait_for(lambda: world.audit_db.exists() and len(world.events(kind="response")) == 1)
    go.touch()
    runner.join(timeout=60)
    result = results[0]
    assert result.code == 0, result.err
    assert result.out.strip() == "200"
    assert "Traceback" not in result.err
    outcomes = world.events(kind="response")
    assert len(outcomes) == 2
    assert "client_disconnected" in json.dumps(outcomes[0])


def test_large_body_streams_through(world: World) -> None:
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        total = 0
        with Outloop().stream("crm", "GET", "/big?mb=20") as stream:
            for chunk in stream.iter_chunks():
                total += len(chunk)
        print(total)
    """)
    assert result.out.strip() == str(20 * 1024 * 1024), result.err
