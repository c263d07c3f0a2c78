"""Acceptance 5 of the run path: 1,000 concurrent requests, every one audited, and nothing lost to kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

from conftest import OUTLOOP, PYTHON, World

from outloop_cli.audit.schema import open_readonly
from outloop_cli.audit.verify import verify_run


def test_thousand_requests_from_eight_threads_are_all_answered_and_audited(world: World) -> None:
    result = world.run_loop("""
        from concurrent.futures import ThreadPoolExecutor
        from outloop_cli.client import Outloop
        client = Outloop()
        def call(i):
            return client.request("crm", "GET", f"/crm/v3/objects/contacts/{i}").status
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(call, range(1000)))
        print(statuses.count(200), len(statuses))
    """, timeout=120)
    assert result.out.split() == ["1000", "1000"], result.err
    run_id = world.last_run_id()
    requests = world.events(run_id, kind="request")
    assert len(requests) == 1000
    assert {event["decision"] for event in requests} == {"allow"}
    assert len(world.events(run_id, kind="response")) == 1000
    assert len(world.upstream.requests) == 1000
    conn = open_readonly(world.audit_db)
    try:
        verdict = verify_run(conn, run_id)
    finally:
        conn.close()
    assert verdict.status == "ok", verdict


def test_kill_9_of_outloop_loses_no_event_whose_response_the_child_received(world: World) -> None:
    received = world.work / "received"
    script = world.work / "loop.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from concurrent.futures import ThreadPoolExecutor
        from outloop_cli.client import Outloop
        client = Outloop()
        out = open({str(received)!r}, "a", buffering=1)
        def worker(k):
            i = 0
            while True:
                try:
                    response = client.request("crm", "GET", f"/crm/v3/objects/contacts/{{k}}-{{i}}")
                except Exception:
                    return
                if response.status == 200:
                    out.write(f"{{k}}-{{i}}\\n")
                i += 1
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(worker, range(4)))
    """))
    process = subprocess.Popen([OUTLOOP, "run", "-w", "acme", "--profiles", str(world.profiles), "--",
                                PYTHON, str(script)], env=world.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=world.work)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if received.exists() and len(received.read_text().splitlines()) >= 300:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    _kill_leftovers(script)  # the orphaned child, if it has not noticed the dead socket yet
    got = set(received.read_text().split())
    assert len(got) >= 300
    audited = {str(event["path"]).rsplit("/", 1)[1] for event in world.events(kind="request")}
    assert got <= audited, sorted(got - audited)[:5]
    conn = open_readonly(world.audit_db)
    try:
        verdict = verify_run(conn, world.last_run_id())
    finally:
        conn.close()
    assert verdict.status == "incomplete", verdict


def _kill_leftovers(script: object) -> None:
    import psutil

    leftovers = [process for process in psutil.process_iter(["cmdline"])
                 if str(script) in " ".join(process.info["cmdline"] or [])]
    for process in leftovers:
        process.kill()
    psutil.wait_procs(leftovers, timeout=10)  # gone, so nothing writes what the test reads next
