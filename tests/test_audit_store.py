"""Tests for the audit store and verifier, against real SQLite files.

They pin what the broker and operators rely on: commit before return, fail closed, tamper evidence.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from operator_support import wait_for

from outloop_cli.audit import (
    EventRow,
    RequestRecord,
    ResponseRecord,
    RunLog,
    get_run,
    iter_events,
    list_runs,
    open_readonly,
    prune,
    query_exchanges,
    run_events,
    verify_all,
    verify_run,
)
from outloop_cli.audit.schema import SCHEMA_VERSION
from outloop_cli.errors import AuditError, StateDirError, UsageError

REPO = Path(__file__).resolve().parents[1]


def allow(path: str = "/crm/v3/objects/contacts", credential: str = "crm") -> RequestRecord:
    return RequestRecord(credential, "GET", "api.hubapi.com", path, "allow", "rule_match", "GET /crm/**")


def deny(path: str = "/crm/v3/objects/contacts/1/merge", credential: str = "crm") -> RequestRecord:
    return RequestRecord(credential, "POST", "api.hubapi.com", path, "deny", "deny_rule", "* /**/merge", 403)


def start(db: Path, run_id: str = "01RUN", workspace: str = "acme", **kwargs: float) -> RunLog:
    return RunLog.start(
        db,
        run_id=run_id,
        workspace=workspace,
        command=["python", "loop.py"],
        detail={"sandbox": {"network": "broker-only"}},
        **kwargs,
    )


def finished_run(db: Path, run_id: str = "01RUN", requests: int = 4, workspace: str = "acme") -> None:
    """A finished run of 2 + 2*requests events: start, (request, response)..., end."""
    log = start(db, run_id, workspace)
    for i in range(requests):
        if i % 2:
            log.record_request(deny())
        else:
            seq = log.record_request(allow())
            log.record_response(ResponseRecord(seq, 200, 12.5, 100, 2048))
        if i % 2:
            log.record_event("limit_hit", credential="crm", reason="rate")
    log.finish(exit_code=0, duration=1.5, detail={"strays_killed": 0})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "audit.db"


Opener = Callable[[], sqlite3.Connection]


@pytest.fixture
def conn(db: Path) -> Iterator[Opener]:
    """Opens a raw writable connection for tampering, once the test has written its runs."""
    connections: list[sqlite3.Connection] = []

    def opener() -> sqlite3.Connection:
        connection = sqlite3.connect(db, isolation_level=None)
        connections.append(connection)
        return connection

    yield opener
    for connection in connections:
        connection.close()


def run_script(db: Path, body: str) -> subprocess.Popen[bytes]:
    script = "from pathlib import Path\nfrom outloop_cli.audit import *\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DB": str(db)}
    return subprocess.Popen([sys.executable, "-c", script], env=env)


# -- opening, files, schema ---------------------------------------------------------------------------


def test_database_is_in_wal_mode_with_normal_sync(db: Path) -> None:
    finished_run(db)
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_and_its_directory_are_private(db: Path) -> None:
    log = start(db)
    log.record_request(allow())
    for path in db.parent.iterdir():  # audit.db, -wal and -shm while the run is live
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    log.finish(exit_code=0, duration=0.1, detail={})


def test_empty_file_is_migrated_to_the_current_schema(db: Path) -> None:
    db.parent.mkdir()
    db.touch()
    finished_run(db)
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "events", "pruned"} <= tables


def test_reading_an_empty_file_migrates_it_first(db: Path) -> None:
    db.parent.mkdir()
    db.touch()
    assert list_runs(open_readonly(db)) == []


def test_newer_schema_is_refused_and_left_untouched(db: Path) -> None:
    db.parent.mkdir()
    with sqlite3.connect(db) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = db.read_bytes()
    expected = f"newer outloop (schema {SCHEMA_VERSION + 1}, this one knows {SCHEMA_VERSION}); upgrade outloop"
    with pytest.raises(AuditError, match=re.escape(expected)):
        start(db)
    with pytest.raises(AuditError, match="newer outloop"):
        open_readonly(db)
    with pytest.raises(AuditError, match="newer outloop"):
        prune(db, older_than=time.time())
    assert db.read_bytes() == before
    assert not Path(f"{db}-wal").exists()


def test_missing_database_is_explained_to_readers(db: Path) -> None:
    with pytest.raises(AuditError, match=r"no audit database at .* yet: run `outloop run` first"):
        open_readonly(db)


def test_a_non_database_file_is_an_audit_error(db: Path) -> None:
    db.parent.mkdir()
    db.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(AuditError, match="cannot open the audit database"):
        start(db)


def test_readonly_connection_cannot_write(db: Path) -> None:
    finished_run(db)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        open_readonly(db).execute("DELETE FROM events")


# -- writing and reading back -------------------------------------------------------------------------


def test_start_request_response_finish_round_trip(db: Path) -> None:
    log = start(db)
    allowed = log.record_request(allow())
    log.record_response(ResponseRecord(allowed, 201, 12.5, 100, 2048))
    denied = log.record_request(deny())
    reveal = log.record_event("reveal", credential="mail", decision="allow", reason="reveal_enabled", note="x")
    assert (allowed, denied, reveal) == (1, 3, 4)
    assert (log.allowed, log.denied) == (1, 1)
    head, count = log.finish(exit_code=3, duration=2.25, detail={"peak_memory": 1024})
    assert count == 6

    reader = open_readonly(db)
    run = get_run(reader, "last")
    assert run is not None
    assert run == get_run(reader, "01RUN")
    assert (run.workspace, run.command, run.exit_code, run.duration) == (
        "acme",
        ["python", "loop.py"],
        3,
        2.25,
    )
    assert (run.allowed, run.denied, run.head_hash, run.event_count, run.incomplete) == (1, 1, head, 6, False)
    assert run.sandbox == {"network": "broker-only"}

    events = run_events(reader, "01RUN")
    assert [e.kind for e in events] == ["run_start", "request", "response", "request", "reveal", "run_end"]
    assert events[-1].hash == head
    response = events[2]
    assert (response.request_seq, response.status, response.latency_ms) == (1, 201, 12.5)
    assert (response.bytes_in, response.bytes_out) == (100, 2048)
    assert (response.credential, response.method, response.path) == ("crm", "GET", "/crm/v3/objects/contacts")
    assert (events[3].decision, events[3].status, events[3].rule) == ("deny", 403, "* /**/merge")
    assert events[4].detail == {"note": "x"}
    assert events[0].detail == {"sandbox": {"network": "broker-only"}, "command": ["python", "loop.py"]}
    end = events[-1].detail
    assert end is not None
    assert end["exit_code"] == 3 and end["peak_memory"] == 1024
    assert (end["event_count"], end["head_hash"]) == (5, events[-2].hash)
    assert [e.seq for e in run_events(reader, "01RUN", after_seq=3, limit=1)] == [4]
    assert verify_run(reader, "01RUN").status == "ok"


def test_query_values_are_never_stored(db: Path) -> None:
    log = start(db)
    log.record_request(allow("/v1/search?api_key=SEKRIT&q=hunter2#frag"))
    log.finish(exit_code=0, duration=0.1, detail={})
    assert b"SEKRIT" not in db.read_bytes() and b"hunter2" not in db.read_bytes()
    assert [e.event.path for e in query_exchanges(open_readonly(db))] == ["/v1/search?api_key&q"]


def requests(reader: sqlite3.Connection, **filters: Any) -> list[EventRow]:
    return [exchange.event for exchange in query_exchanges(reader, **filters)]


def test_query_exchanges_filters_and_orders_newest_first(db: Path) -> None:
    log = start(db, "01A", "acme")
    log.record_request(allow(credential="crm"))
    log.record_request(deny(credential="crm"))
    middle = time.time()
    wait_for(lambda: time.time() > middle)
    log.record_request(deny(credential="mail"))
    log.finish(exit_code=0, duration=0.1, detail={})
    other = start(db, "01B", "globex")
    other.record_request(deny())
    other.finish(exit_code=0, duration=0.1, detail={})

    reader = open_readonly(db)
    acme_denials = requests(reader, workspace="acme", decision="deny")
    assert [(e.credential, e.seq) for e in acme_denials] == [("mail", 3), ("crm", 2)]
    assert [e.seq for e in requests(reader, workspace="acme", since=middle)] == [3]
    assert [e.seq for e in requests(reader, workspace="acme", until=middle)] == [2, 1]
    assert len(requests(reader, credential="crm")) == 3
    assert len(requests(reader, limit=2)) == 2
    assert {e.kind for e in iter_events(reader)} == {"run_start", "request", "run_end"}
    assert [r.run_id for r in list_runs(reader)] == ["01B", "01A"]
    assert [r.run_id for r in list_runs(reader, workspace="acme")] == ["01A"]


def test_reserved_kinds_and_bad_decisions_are_rejected(db: Path) -> None:
    log = start(db)
    with pytest.raises(ValueError, match="dedicated"):
        log.record_event("request", credential="crm")
    with pytest.raises(ValueError, match="decision"):
        log.record_request(RequestRecord("crm", "GET", None, "/", "maybe", "r", None))
    log.finish(exit_code=0, duration=0.1, detail={})


def test_a_finished_log_refuses_further_writes(db: Path) -> None:
    log = start(db)
    log.finish(exit_code=0, duration=0.1, detail={})
    with pytest.raises(AuditError, match="already closed"):
        log.record_request(allow())


def test_requests_racing_finish_never_land_after_run_end(db: Path) -> None:
    log = start(db)
    outcomes: list[str] = []
    recorded: set[int] = set()

    def worker(index: int) -> None:
        while True:
            try:
                log.record_request(allow())
            except AuditError:
                outcomes.append("refused")
                return
            recorded.add(index)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(recorded) == 4)  # every worker is recording when finish comes
    log.finish(exit_code=0, duration=0.1, detail={})
    for thread in threads:
        thread.join()
    assert outcomes == ["refused"] * 4
    reader = open_readonly(db)
    assert run_events(reader, "01RUN")[-1].kind == "run_end"
    assert verify_run(reader, "01RUN").status == "ok"


def test_reusing_a_run_id_is_an_audit_error(db: Path) -> None:
    finished_run(db)
    with pytest.raises(AuditError, match="cannot write"):
        start(db)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(),
    number=st.floats(),
    finite=st.floats(allow_nan=False, allow_infinity=False),
    count=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    flag=st.booleans(),
)
def test_any_field_values_read_back_hash_identically(
    tmp_path: Path, text: str, number: float, finite: float, count: int, flag: bool
) -> None:
    db = tmp_path / f"{time.monotonic_ns()}.db"
    log = RunLog.start(db, run_id="01H", workspace="acme", command=[text], detail={text: finite})
    seq = log.record_request(RequestRecord(text, text, text, text, "allow", text, text, count))
    log.record_response(ResponseRecord(seq, count, number, count, flag, text))
    log.record_event(text + "x", latency_ms=number, status=flag, detail={"v": text}, extra=finite)
    log.finish(exit_code=count, duration=finite, detail={"t": text})
    verdicts = verify_all(open_readonly(db))
    assert [v.status for v in verdicts] == ["ok"], verdicts


# -- concurrency ----------------------------------------------------------------------------------------


def test_group_commit_from_eight_threads_gives_contiguous_seqs(db: Path) -> None:
    log = start(db)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [log.record_request(allow()) for _ in range(200)]
        with lock:
            seqs.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seqs) == list(range(1, 1601))
    assert log.finish(exit_code=0, duration=1.0, detail={})[1] == 1602
    verdict = verify_run(open_readonly(db), "01RUN")
    assert (verdict.status, verdict.events) == ("ok", 1602)


def test_concurrent_runs_from_separate_processes_all_verify(db: Path) -> None:
    body = """
        import os, sys
        log = RunLog.start(Path(os.environ["DB"]), run_id=sys.argv[1], workspace="acme", command=["x"],
                           detail={})
        for i in range(150):
            seq = log.record_request(RequestRecord("crm", "GET", "h", f"/p/{i}", "allow", "r", "GET /**"))
            log.record_response(ResponseRecord(seq, 200, 1.0, 1, 1))
        log.finish(exit_code=0, duration=1.0, detail={})
    """
    script = "import sys\nfrom pathlib import Path\nfrom outloop_cli.audit import *\n" + textwrap.dedent(body)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"01P{n}"],
            env={**os.environ, "PYTHONPATH": str(REPO), "DB": str(db)},
        )
        for n in range(6)
    ]  # fmt: skip
    assert [proc.wait(timeout=120) for proc in procs] == [0] * 6
    verdicts = verify_all(open_readonly(db))
    assert [(v.run_id, v.status, v.events) for v in verdicts] == [(f"01P{n}", "ok", 302) for n in range(6)]


def test_async_variants_commit_from_an_event_loop(db: Path) -> None:
    log = start(db)

    async def client(n: int) -> list[int]:
        seqs = []
        for _ in range(50):
            seq = await log.record_request_async(allow())
            seqs.append(seq)
            seqs.append(await log.record_response_async(ResponseRecord(seq, 200, 3.0, 10, 20)))
        return seqs

    async def main() -> list[list[int]]:
        ticks = 0

        async def ticker() -> None:  # proves the loop is never blocked while commits happen
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(client(n) for n in range(8)))
        tick_task.cancel()
        assert ticks > 100
        return results

    results = asyncio.run(main())
    assert sorted(seq for seqs in results for seq in seqs) == list(range(1, 801))
    assert log.allowed == 400
    log.finish(exit_code=0, duration=1.0, detail={})
    assert verify_run(open_readonly(db), "01RUN").status == "ok"


def test_a_decision_alone_is_committed_on_the_callers_thread_with_the_outcomes_kept_so_far(db: Path) -> None:
    """Nothing else in flight: no thread hand-off at all. The coroutine finishes without ever suspending, and
    the outcome recorded before it shares its commit."""
    log = start(db)

    def without_suspending(coroutine: Any) -> int:
        with pytest.raises(StopIteration) as finished:
            coroutine.send(None)
        return int(finished.value.value)

    first = without_suspending(log.record_request_async(allow(), alone=True))
    log.record_response(ResponseRecord(first, 200, 1.0, 1, 1))
    second = without_suspending(log.record_request_async(allow(), alone=True))
    assert (first, second) == (1, 3)
    log.finish(exit_code=0, duration=0.1, detail={})
    reader = open_readonly(db)
    events = run_events(reader, "01RUN")
    assert [(event.kind, event.request_seq) for event in events] == [
        ("run_start", None), ("request", None), ("response", 1), ("request", None), ("run_end", None)]
    assert events[-1].detail is not None and events[-1].detail["commits"] == 3  # start, then one per decision
    assert verify_run(reader, "01RUN").status == "ok"


def test_a_decision_alone_waits_for_the_writer_when_another_process_holds_the_lock(db: Path) -> None:
    """The caller's thread tries once (LOCK_POLL_MS) and never blocks on the busy timeout: the writer does."""
    log = start(db, busy_timeout=30)
    locker = hold_write_lock(db)

    async def main() -> int:
        decision = asyncio.ensure_future(log.record_request_async(allow(), alone=True))
        await asyncio.sleep(0)
        assert not decision.done()  # queued: the event loop is free while the writer waits for the lock
        locker.execute("ROLLBACK")
        return await decision

    assert asyncio.run(main()) == 1
    locker.close()
    log.finish(exit_code=0, duration=0.1, detail={})
    assert verify_run(open_readonly(db), "01RUN").status == "ok"


def test_a_failed_commit_on_the_callers_thread_refuses_and_keeps_its_outcomes(db: Path) -> None:
    log = start(db)
    with sqlite3.connect(db, isolation_level=None) as other:  # a row the database refuses, and not for a lock
        other.execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.path = '/poison' "
                      "BEGIN SELECT RAISE(ABORT, 'refused'); END")

    async def main() -> None:
        seq = await log.record_request_async(allow(), alone=True)
        log.record_response(ResponseRecord(seq, 200, 1.0, 1, 1))
        with pytest.raises(AuditError, match="cannot write to the audit database"):
            await log.record_request_async(allow("/poison"), alone=True)  # the outcome was in the same batch
        await log.record_request_async(allow(), alone=True)

    asyncio.run(main())
    log.finish(exit_code=0, duration=0.1, detail={})
    reader = open_readonly(db)
    events = run_events(reader, "01RUN")
    assert sorted(event.kind for event in events) == ["request", "request", "response", "run_end", "run_start"]
    assert [event.request_seq for event in events if event.kind == "response"] == [1]  # retried by the writer
    assert events[-1].detail is not None and events[-1].detail["lost_events"] == 0
    assert verify_run(reader, "01RUN").status == "ok"


def test_decisions_alone_and_queued_ones_from_another_thread_make_one_chain(db: Path) -> None:
    """The caller-thread commit and the writer thread take turns on one chain: every decision and every outcome
    lands exactly once, in a contiguous chain that run_end counts in full."""
    log = start(db)
    count = 200

    def queued() -> None:
        for i in range(count):
            seq = log.record_request(allow())
            log.record_response(ResponseRecord(seq, 200, 1.0, count + i, 1))

    async def main() -> None:
        other = threading.Thread(target=queued)
        other.start()
        for i in range(count):
            seq = await log.record_request_async(allow(), alone=True)
            log.record_response(ResponseRecord(seq, 200, 1.0, i, 1))
        await asyncio.get_running_loop().run_in_executor(None, other.join)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads change hands often, inside the commits too
    try:
        asyncio.run(main())
    finally:
        sys.setswitchinterval(interval)
    log.finish(exit_code=0, duration=0.1, detail={})
    reader = open_readonly(db)
    events = run_events(reader, "01RUN")
    assert [event.seq for event in events] == list(range(len(events)))
    assert sorted(event.bytes_in or 0 for event in events if event.kind == "response") == list(range(2 * count))
    end = events[-1]
    assert end.kind == "run_end" and end.detail is not None
    assert (end.detail["allowed"], end.detail["lost_events"]) == (2 * count, 0)
    assert verify_run(reader, "01RUN").status == "ok"


def test_a_database_gone_bad_refuses_a_decision_alone_as_an_audit_error(db: Path) -> None:
    """Not only a lock: whatever SQLite answers to the caller-thread commit is the AuditError the broker turns
    into 503 audit_unavailable, as on the writer's thread."""
    log = start(db)
    log.record_request(allow())
    with sqlite3.connect(db, isolation_level=None) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next transaction reads the header from the file
    with db.open("r+b") as handle:
        handle.write(b"not an audit db!")

    async def decide() -> int:
        return await log.record_request_async(allow(), alone=True)

    refused = "cannot write to the audit database at .*: file is not a database"
    with pytest.raises(AuditError, match=refused):
        asyncio.run(decide())
    with pytest.raises(AuditError, match=refused):  # the writer's answer, for comparison
        log.record_request(allow())


def test_an_outcome_wakes_nobody_and_is_committed_within_a_tick(db: Path) -> None:
    log = start(db)
    seq = log.record_request(allow())
    log.record_response(ResponseRecord(seq, 200, 1.0, 1, 1))
    reader = open_readonly(db)
    wait_for(lambda: [event.kind for event in run_events(reader, "01RUN")][-1:] == ["response"], timeout=5)
    log.finish(exit_code=0, duration=0.1, detail={})


# -- failing closed ------------------------------------------------------------------------------------


def hold_write_lock(db: Path) -> sqlite3.Connection:
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


def test_record_request_fails_closed_when_the_database_stays_locked(db: Path) -> None:
    log = start(db, busy_timeout=0.2)
    locker = hold_write_lock(db)
    with pytest.raises(AuditError) as refused:
        log.record_request(allow("/p?token=SEKRIT"))
    message = str(refused.value)
    assert "cannot write to the audit database" in message and "locked" in message
    assert refused.value.exit_code == 125 and "SEKRIT" not in message
    locker.execute("ROLLBACK")
    locker.close()
    assert log.record_request(allow()) == 1  # the refused event's seq is reused: no gap in the chain
    log.finish(exit_code=0, duration=0.1, detail={})
    assert verify_run(open_readonly(db), "01RUN").status == "ok"


def test_async_request_fails_closed_too(db: Path) -> None:
    log = start(db, busy_timeout=0.2)
    locker = hold_write_lock(db)

    async def attempt() -> int:
        return await log.record_request_async(allow())

    with pytest.raises(AuditError, match="locked"):
        asyncio.run(attempt())
    locker.close()
    log.finish(exit_code=0, duration=0.1, detail={})


def test_an_outcome_whose_batch_failed_is_written_with_the_next_batch(db: Path) -> None:
    log = start(db, busy_timeout=0.2)
    seq = log.record_request(allow())
    locker = hold_write_lock(db)
    log.record_response(ResponseRecord(seq, 200, 1.0, 1, 1))
    with pytest.raises(AuditError, match="locked"):  # the outcome waits to share this decision's commit
        log.record_request(allow())
    locker.close()
    assert log.record_request(allow()) == 3  # run_start, request, then the outcome carried over: seq 2
    log.finish(exit_code=0, duration=0.1, detail={})
    reader = open_readonly(db)
    events = run_events(reader, "01RUN")
    assert [(event.kind, event.request_seq) for event in events[1:4]] == [("request", None), ("response", seq),
                                                                           ("request", None)]
    assert events[-1].detail is not None and events[-1].detail["lost_events"] == 0
    assert verify_run(reader, "01RUN").status == "ok"


def test_an_outcome_failing_in_two_batches_is_counted_lost_in_run_end(db: Path) -> None:
    log = start(db, busy_timeout=0.2)
    seq = log.record_request(allow())
    locker = hold_write_lock(db)
    log.record_response(ResponseRecord(seq, 200, 1.0, 1, 1))
    for _ in range(2):  # its own batch and the one it was carried into
        with pytest.raises(AuditError, match="locked"):
            log.record_request(allow())
    locker.close()
    log.finish(exit_code=0, duration=0.1, detail={})
    reader = open_readonly(db)
    events = run_events(reader, "01RUN")
    assert [event.kind for event in events] == ["run_start", "request", "run_end"]
    assert events[-1].detail is not None and events[-1].detail["lost_events"] == 1
    assert verify_run(reader, "01RUN").status == "ok"


def test_a_directory_where_the_database_should_be_fails_closed(db: Path) -> None:
    db.mkdir(parents=True)
    with pytest.raises(StateDirError, match="is not a regular file"):
        start(db)


def test_finish_fails_closed_and_leaves_the_run_incomplete(db: Path) -> None:
    log = start(db, busy_timeout=0.2)
    locker = hold_write_lock(db)
    with pytest.raises(AuditError, match="locked"):
        log.finish(exit_code=0, duration=0.1, detail={})
    locker.close()
    assert verify_run(open_readonly(db), "01RUN").status == "incomplete"


# -- tamper evidence -----------------------------------------------------------------------------------

# A finished_run(requests=4) holds: 0 run_start, 1 request, 2 response, 3 request(deny), 4 limit_hit,
# 5 request, 6 response, 7 request(deny), 8 limit_hit, 9 run_end.
EDITS = [
    ("path", "'/other'", 1),
    ("decision", "'allow'", 3),
    ("ts", "ts + 0.000001", 2),
    ("latency_ms", "latency_ms * 2", 6),
    ("status", "201", 2),
    ("bytes_out", "0", 2),
    ("credential", "'mail'", 5),
    ("reason", "NULL", 4),
    ("workspace", "'globex'", 0),
    ("kind", "'response'", 1),
    ("detail", "'{\"exit_code\":0}'", 9),
    ("hash", "prev_hash", 5),
    ("prev_hash", "hash", 5),
    ("seq", "99", 5),
]


@pytest.mark.parametrize(("column", "expression", "seq"), EDITS, ids=[edit[0] for edit in EDITS])
def test_editing_any_event_column_is_broken_at_that_seq(
    db: Path, conn: Opener, column: str, expression: str, seq: int
) -> None:
    finished_run(db, "01A")
    finished_run(db, "01B")
    conn().execute(f"UPDATE events SET {column} = {expression} WHERE run_id = '01B' AND seq = {seq}")
    verdicts = {v.run_id: v for v in verify_all(open_readonly(db))}
    assert verdicts["01A"].status == "ok"
    broken = verdicts["01B"]
    assert (broken.status, broken.first_bad_seq) == ("broken", seq), broken
    assert broken.problem


@pytest.mark.parametrize(
    ("where", "seq", "problem"),
    [
        ("seq = 4", 4, "event 4 is missing"),
        ("seq = 9", 9, "deleted"),
        ("seq >= 6", 6, "deleted"),
        ("seq = 0", 0, "event 0 is missing"),
    ],
    ids=["middle_event", "run_end", "truncated_tail", "run_start"],
)
def test_deleting_events_is_broken_naming_the_first_missing_seq(
    db: Path, conn: Opener, where: str, seq: int, problem: str
) -> None:
    finished_run(db)
    conn().execute(f"DELETE FROM events WHERE run_id = '01RUN' AND {where}")
    verdict = verify_run(open_readonly(db), "01RUN")
    assert (verdict.run_id, verdict.status, verdict.first_bad_seq) == ("01RUN", "broken", seq)
    assert verdict.problem is not None and problem in verdict.problem


@pytest.mark.parametrize(
    ("assignment", "seq"),
    [
        ("head_hash = '" + "f" * 64 + "'", 9),
        ("event_count = 9", 9),
        ("exit_code = 1", 9),
        ("ended_at = NULL", 9),
        ("allowed = 3", 9),
        ("command = '[\"true\"]'", 0),
        ("workspace = 'globex'", 0),
    ],
)
def test_editing_the_runs_row_is_broken(db: Path, conn: Opener, assignment: str, seq: int) -> None:
    finished_run(db)
    conn().execute(f"UPDATE runs SET {assignment}")
    verdict = verify_run(open_readonly(db), "01RUN")
    assert (verdict.status, verdict.first_bad_seq) == ("broken", seq), verdict


def test_events_without_their_runs_row_are_broken(db: Path, conn: Opener) -> None:
    finished_run(db)
    conn().execute("DELETE FROM runs")
    [verdict] = verify_all(open_readonly(db))
    assert (verdict.run_id, verdict.status) == ("01RUN", "broken")
    assert verdict.problem is not None and "runs table" in verdict.problem


def test_verifying_an_unknown_run_is_a_usage_error(db: Path) -> None:
    finished_run(db)
    with pytest.raises(UsageError, match="no run nope"):
        verify_run(open_readonly(db), "nope")


# -- killed runs and pruning ---------------------------------------------------------------------------

KILLED_RUN = """
    import os
    log = RunLog.start(Path(os.environ["DB"]), run_id="01KILLED", workspace="acme", command=["x"], detail={})
    for i in range(5):
        log.record_request(RequestRecord("crm", "GET", "h", "/p", "allow", "r", "GET /**"))
    os._exit(9)
"""


def test_a_killed_run_whose_chain_holds_is_incomplete_not_broken(db: Path) -> None:
    assert run_script(db, KILLED_RUN).wait(timeout=60) == 9
    reader = open_readonly(db)
    verdict = verify_run(reader, "01KILLED")
    assert (verdict.status, verdict.events, verdict.problem) == ("incomplete", 6, None)
    run = get_run(reader, "01KILLED")
    assert run is not None and run.incomplete and run.allowed == 5


def test_truncating_a_killed_run_is_still_detected(db: Path, conn: Opener) -> None:
    assert run_script(db, KILLED_RUN).wait(timeout=60) == 9
    conn().execute("DELETE FROM events WHERE seq = 5")
    verdict = verify_run(open_readonly(db), "01KILLED")
    assert (verdict.status, verdict.first_bad_seq) == ("broken", 5)


def test_prune_leaves_markers_and_verify_reports_no_breaks(db: Path, conn: Opener) -> None:
    finished_run(db, "01OLD1")
    finished_run(db, "01OLD2")
    assert run_script(db, KILLED_RUN).wait(timeout=60) == 9
    cutoff = time.time()
    wait_for(lambda: time.time() > cutoff)
    finished_run(db, "01NEW")
    assert prune(db, older_than=cutoff) == 2
    reader = open_readonly(db)
    statuses = {v.run_id: (v.status, v.events) for v in verify_all(reader)}
    assert statuses == {
        "01OLD1": ("pruned", 10),
        "01OLD2": ("pruned", 10),
        "01KILLED": ("incomplete", 6),
        "01NEW": ("ok", 10),
    }
    assert run_events(reader, "01OLD1") == [] and get_run(reader, "01OLD1") is None
    marker = conn().execute("SELECT head_hash, event_count FROM pruned WHERE run_id = '01OLD1'").fetchone()
    assert marker[1] == 10 and len(marker[0]) == 64
    assert prune(db, older_than=cutoff) == 0


def test_events_reappearing_for_a_pruned_run_are_broken(db: Path, conn: Opener) -> None:
    finished_run(db, "01OLD")
    prune(db, older_than=time.time() + 1)
    conn().execute(
        "INSERT INTO events (run_id, seq, ts, kind, workspace, prev_hash, hash) "
        "VALUES ('01OLD', 0, 1.0, 'run_start', 'acme', 'x', 'y')"
    )
    [verdict] = verify_all(open_readonly(db))
    assert verdict.status == "broken"


def test_details_are_json_only(db: Path) -> None:
    with pytest.raises(AuditError, match="not JSON-serialisable"):
        RunLog.start(db, run_id="x", workspace="acme", command=[], detail={"p": Path("/")})
    log = start(db)
    with pytest.raises(AuditError, match="not JSON-serialisable"):
        log.finish(exit_code=0, duration=0.1, detail={"s": {1, 2}})
    assert json.loads(json.dumps([v.status for v in verify_all(open_readonly(db))])) == ["incomplete"]


def test_commits_never_checkpoint_and_the_log_checkpoints_off_the_commit_path(db: Path, tmp_path: Path) -> None:
    log = start(db)
    assert log._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for _ in range(300):
        log.record_request(allow())
    log.finish(exit_code=0, duration=1.0, detail={})
    # The main database file alone (no WAL) already holds every event: the checkpointer copied them.
    alone = tmp_path / "alone.db"
    alone.write_bytes(db.read_bytes())
    copy = sqlite3.connect(alone)
    try:
        assert copy.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 302
    finally:
        copy.close()
