"""Regenerate audit-schema1.db: an audit database written by outloop's schema-1 writer, for the migration test.

The writer is loaded from the last commit that had schema 1, so the fixture is what a user's disk really holds:
    python tests/data/make_schema1_db.py
"""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
from pathlib import Path

SCHEMA1_COMMIT = "3cd34cc"  # the store as released before outcomes were joined to requests
HERE = Path(__file__).parent
TARGET = HERE / "audit-schema1.db"
GONE_PID = 2**22 + 1  # above Linux's highest pid_max: the recorded outloop process is never found alive
RUNS = ("01J0000000000000000000000A", "01J0000000000000000000000B", "01J0000000000000000000000C")


def old_store() -> object:
    source = subprocess.run(["git", "show", f"{SCHEMA1_COMMIT}:outloop_cli/audit/store.py"], cwd=HERE,
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("schema1_store", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["schema1_store"] = module  # dataclasses look their module up while the class is built
    exec(compile(source, "schema1_store.py", "exec"), module.__dict__)  # our own history, not outside input
    return module


def main() -> None:
    store = old_store()
    TARGET.unlink(missing_ok=True)
    request, response, runlog = store.RequestRecord, store.ResponseRecord, store.RunLog  # type: ignore[attr-defined]

    # A: two allowed requests (200, then an expired token's 401) and a denial; exit 0.
    log = runlog.start(TARGET, run_id=RUNS[0], workspace="acme", command=["python", "loop.py"],
                       detail={"sandbox": {"network": "broker-only"}, "pid": GONE_PID})
    seq = log.record_request(request("crm", "GET", "crm.example", "/contacts/1", "allow", "allowed", "GET /**"))
    log.record_response(response(seq, 200, 12.5, 0, 321))
    seq = log.record_request(request("crm", "GET", "crm.example", "/contacts/2", "allow", "allowed", "GET /**"))
    log.record_response(response(seq, 401, 3.0, 0, 40))
    log.record_request(request("crm", "DELETE", "crm.example", "/contacts/2", "deny", "no_matching_rule", None, 403))
    log.finish(exit_code=0, duration=1.5, detail={})

    # B: the upstream cannot be reached (the broker's 502); the loop exits 1.
    log = runlog.start(TARGET, run_id=RUNS[1], workspace="globex", command=["python", "loop.py"],
                       detail={"sandbox": {"network": "broker-only"}, "pid": GONE_PID})
    seq = log.record_request(request("billing", "GET", "billing.example", "/invoices", "allow", "allowed", "GET /**"))
    log.record_response(response(seq, 502, 1.0, 0, 0, "upstream_error"))
    log.finish(exit_code=1, duration=0.5, detail={})

    # C: killed after one allowed request, before its outcome or its end were recorded.
    log = runlog.start(TARGET, run_id=RUNS[2], workspace="acme", command=["python", "loop.py"],
                       detail={"sandbox": {"network": "broker-only"}, "pid": GONE_PID})
    log.record_request(request("crm", "GET", "crm.example", "/contacts/3", "allow", "allowed", "GET /**"))
    log._queue.put(None)  # stop the writer as a dying process would: no run_end
    log._thread.join()
    log._stopping.set()
    log._checkpointer.join()

    conn = sqlite3.connect(TARGET)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file in the repository
    conn.close()


if __name__ == "__main__":
    main()
