"""End to end, the audit comes first: a request whose decision cannot be committed never goes upstream.

A live run's audit.db is locked by another process between two requests; the second must get 503
`audit_unavailable` and the recording upstream must see only the first.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import textwrap

from conftest import OUTLOOP, PYTHON, World
from operator_support import wait_for

LOOP = """
    import json, os, sys, time
    from outloop_cli.client import Outloop
    ready, go, answer = sys.argv[1:4]
    client = Outloop()
    first = client.request("crm", "GET", "/crm/v3/objects/contacts/1")
    open(ready, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:  # the test locks audit.db meanwhile
        time.sleep(0.02)
    second = client.request("crm", "GET", "/crm/v3/objects/contacts/2")
    with open(answer + ".part", "w") as handle:
        json.dump({"first": first.status, "second": second.status, "error": second.error}, handle)
    os.rename(answer + ".part", answer)
"""


def test_a_locked_audit_database_stops_requests_before_they_reach_the_upstream(world: World) -> None:
    ready, go, answer = world.work / "ready", world.work / "go", world.work / "answer.json"
    script = world.work / "loop.py"
    script.write_text(textwrap.dedent(LOOP))
    process = subprocess.Popen([OUTLOOP, "run", "-w", "acme", "--profiles", str(world.profiles), "--", PYTHON,
                                str(script), str(ready), str(go), str(answer)],
                               env=world.env, cwd=world.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for(ready.exists)
        locker = sqlite3.connect(world.audit_db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock: nothing can be committed
        try:
            go.touch()
            wait_for(answer.exists, timeout=60)  # the broker waits out its busy timeout first
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    result = json.loads(answer.read_text())
    assert (result["first"], result["second"]) == (200, 503), err
    assert "audit_unavailable" in json.dumps(result["error"])
    assert [request.path for request in world.upstream.requests] == ["/crm/v3/objects/contacts/1"]
    assert process.returncode == 0, err
