"""The operator filters of `outloop audit` are answered from an index, never by reading the whole events table.

Every index costs each brokered request a page in its commit, so the events table has only the ones these
filters need, some partial (denials, statuses other than 200, requests by credential). A partial index serves a
query only when the query implies its condition, which is easy to lose in a rewrite; these tests pin the plan
SQLite chooses for each filter, for the statements and bound values the code really runs, on a real audit.db.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import pytest

from outloop_cli.audit import RequestRecord, ResponseRecord, RunLog, iter_events, list_runs, open_readonly
from outloop_cli.audit.store import query_exchanges, run_exchanges

ALLOW = RequestRecord("crm", "GET", "crm.example", "/contacts/1", "allow", "rule_match", "GET /**")
DENY = RequestRecord("crm", "DELETE", "crm.example", "/contacts/1", "deny", "deny_rule", "DELETE /**", 403)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    db = tmp_path_factory.mktemp("plans") / "home" / "audit.db"
    for run_id, workspace in (("01A", "acme"), ("01B", "globex")):
        log = RunLog.start(db, run_id=run_id, workspace=workspace, command=["loop"], detail={})
        for status in (200, 404, 502):
            log.record_response(ResponseRecord(log.record_request(ALLOW), status, 1.0, 0, 10))
        log.record_request(DENY)
        log.finish(exit_code=0, duration=1.0, detail={})
    conn = open_readonly(db)
    yield conn
    conn.close()


class Recorder:
    """Passes statements to a real connection and keeps each with its parameters: SQLite plans a partial index
    from bound values, so the plan must be asked with the same bindings (the trace callback gives literals)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, Sequence[object]]] = []

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        self.statements.append((sql, params))
        return self.conn.execute(sql, params)


def plans(conn: sqlite3.Connection, query: Callable[[sqlite3.Connection], object]) -> list[str]:
    """The plan of every statement ``query`` runs, one line per step."""
    recorder = Recorder(conn)
    query(cast(sqlite3.Connection, recorder))
    return [str(row[3]) for sql, params in recorder.statements
            for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def full_scans(steps: list[str]) -> list[str]:
    """Steps that read a table row by row: "SCAN events" or "SCAN q", with no index named."""
    return [step for step in steps if step.startswith("SCAN ") and " USING " not in step]


EVENTS_FILTERS: dict[str, tuple[dict[str, object], str]] = {
    "newest first": ({}, "SCAN q USING INDEX events_by_ts"),
    "--since": ({"since": 1.0}, "SEARCH q USING INDEX events_by_ts (ts>?)"),
    "--until": ({"until": 1.0}, "SEARCH q USING INDEX events_by_ts (ts<?)"),
    "--workspace": ({"workspace": "acme"}, "SEARCH q USING INDEX events_by_workspace (workspace=?)"),
    "--workspace --since": ({"workspace": "acme", "since": 1.0},
                            "SEARCH q USING INDEX events_by_workspace (workspace=? AND ts>?)"),
    "--decision deny": ({"decision": "deny"}, "SCAN q USING INDEX events_denied"),
    "--decision allow": ({"decision": "allow"}, "SCAN q USING INDEX events_by_ts"),
    "--workspace --decision deny": ({"workspace": "acme", "decision": "deny"},
                                    "SEARCH q USING INDEX events_denied_by_workspace (workspace=?)"),
    "--workspace --decision allow": ({"workspace": "acme", "decision": "allow"},
                                     "SEARCH q USING INDEX events_by_workspace (workspace=?)"),
    "--credential": ({"credential": "crm"}, "SEARCH q USING INDEX events_requests_by_credential (credential=?)"),
    "--credential --decision deny": ({"credential": "crm", "decision": "deny"},
                                     "SEARCH q USING INDEX events_requests_by_credential (credential=?)"),
    "--failed": ({"failed": True}, "SCAN f USING INDEX events_failed"),
    "--status 5xx": ({"statuses": [(500, 599)]}, "SEARCH a USING INDEX events_unusual_status (status>? AND status<?)"),
    "--status 401,5xx": ({"statuses": [(401, 401), (500, 599)]},
                         "SEARCH events USING INDEX events_unusual_status (status>? AND status<?)"),
    "--status 200": ({"statuses": [(200, 200)]}, "SCAN q USING INDEX events_by_ts"),
}


@pytest.mark.parametrize("filters", EVENTS_FILTERS.values(), ids=EVENTS_FILTERS.keys())
def test_each_audit_events_filter_walks_its_index(reader: sqlite3.Connection,
                                                  filters: tuple[dict[str, object], str]) -> None:
    arguments, expected = filters
    steps = plans(reader, lambda conn: query_exchanges(conn, limit=50, **arguments))  # type: ignore[arg-type]
    assert expected in steps, steps
    assert not full_scans(steps), steps
    assert "SEARCH r USING INDEX events_by_request (run_id=? AND request_seq=?) LEFT-JOIN" in steps  # its outcome


def test_the_filters_still_find_what_they_name(reader: sqlite3.Connection) -> None:
    """The rewritten failure and status conditions keep each filter's meaning."""
    def found(**arguments: object) -> list[tuple[str, int]]:
        return sorted((e.event.run_id, e.event.seq) for e in query_exchanges(reader, **arguments))  # type: ignore[arg-type]

    assert found(decision="deny") == [("01A", 7), ("01B", 7)]
    assert found(workspace="globex", decision="deny") == [("01B", 7)]
    assert found(workspace="acme", decision="allow") == [("01A", 1), ("01A", 3), ("01A", 5)]
    assert found(credential="crm", decision="deny", workspace="acme") == [("01A", 7)]
    assert found(failed=True, workspace="globex") == [("01B", 3), ("01B", 5)]
    assert found(statuses=[(403, 404)]) == [("01A", 3), ("01A", 7), ("01B", 3), ("01B", 7)]
    assert found(statuses=[(200, 200)], workspace="acme") == [("01A", 1)]
    assert found(failed=True, statuses=[(500, 599)]) == [("01A", 5), ("01B", 5)]
    assert found(failed=True, statuses=[(200, 404)]) == [("01A", 3), ("01B", 3)]
    with pytest.raises(ValueError, match="decision must be"):  # written into the SQL, so only the two fixed words
        found(decision="deny' OR '1' = '1")


@pytest.mark.parametrize(("statuses", "expected"), [
    ([(500, 599)], "SEARCH events USING INDEX events_unusual_status (status>? AND status<?)"),
    ([(403, 403), (429, 429)], "SEARCH events USING INDEX events_unusual_status (status>? AND status<?)"),
    ([(200, 299)], "SEARCH e USING INDEX sqlite_autoindex_events_1 (run_id=?)"),
], ids=["5xx", "403,429", "2xx"])
def test_audit_runs_by_status_use_an_index(reader: sqlite3.Connection, statuses: list[tuple[int, int]],
                                          expected: str) -> None:
    steps = plans(reader, lambda conn: list_runs(conn, statuses=statuses))
    assert expected in steps, steps
    assert not full_scans(steps), steps
    assert [run.run_id for run in list_runs(reader, statuses=statuses)] == ["01B", "01A"]


@pytest.mark.parametrize(("arguments", "expected"), [
    ({}, "SCAN events USING INDEX events_by_ts"),
    ({"since": 1.0}, "SEARCH events USING INDEX events_by_ts (ts>?)"),
    ({"workspace": "acme"}, "SEARCH events USING INDEX events_by_workspace (workspace=?)"),
], ids=["all", "--since", "--workspace"])
def test_export_reads_in_time_order_from_an_index(reader: sqlite3.Connection, arguments: dict[str, object],
                                                  expected: str) -> None:
    steps = plans(reader, lambda conn: list(iter_events(conn, **arguments)))  # type: ignore[arg-type]
    assert steps == [expected]


def test_a_runs_events_come_from_its_primary_key(reader: sqlite3.Connection) -> None:
    steps = plans(reader, lambda conn: run_exchanges(conn, "01A"))
    assert "SEARCH q USING INDEX sqlite_autoindex_events_1 (run_id=?)" in steps
    assert not full_scans(steps), steps


def test_a_fresh_database_has_exactly_the_indexes_these_plans_name(reader: sqlite3.Connection) -> None:
    names = {str(row[0]) for row in reader.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' AND sql IS NOT NULL")}
    assert names == {"events_by_ts", "events_by_workspace", "events_by_request", "events_failed", "events_denied",
                     "events_denied_by_workspace", "events_requests_by_credential", "events_unusual_status"}


def entered(conn: sqlite3.Connection, rowid: int) -> set[str]:
    """The secondary indexes of events that hold the row: each is one more page written by the commit that adds it."""
    names = set()
    for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' AND sql IS NOT NULL"):
        _, _, condition = str(sql).partition(" WHERE ")
        if conn.execute(f"SELECT 1 FROM events WHERE rowid = ? AND ({condition or '1'})", (rowid,)).fetchone():
            names.add(str(name))
    return names


def test_an_allowed_request_and_its_ok_outcome_enter_three_indexes_each(reader: sqlite3.Connection) -> None:
    """What every brokered request pays for in its commit; the partial indexes are for the exceptions."""
    request, response = reader.execute(
        "SELECT q.rowid, r.rowid FROM events q JOIN events r ON r.run_id = q.run_id AND r.request_seq = q.seq "
        "WHERE q.run_id = '01A' AND r.status = 200").fetchone()
    assert entered(reader, request) == {"events_by_ts", "events_by_workspace", "events_requests_by_credential"}
    assert entered(reader, response) == {"events_by_ts", "events_by_workspace", "events_by_request"}
    denial = reader.execute("SELECT rowid FROM events WHERE run_id = '01A' AND decision = 'deny'").fetchone()[0]
    assert entered(reader, denial) == {"events_by_ts", "events_by_workspace", "events_requests_by_credential",
                                       "events_denied", "events_denied_by_workspace", "events_unusual_status"}
