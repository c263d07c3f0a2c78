"""The operator's read side of audit.db: runs, events, requests joined to their outcomes, and pruning.

The writer (writer.py) and the schema (schema.py) own how rows get there; this module reads them back, and
prunes old runs leaving a marker that verify accepts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeAlias

from outloop_cli.audit.chain import EVENT_COLUMNS, check_decision, error_sql, is_error, now
from outloop_cli.audit.schema import (
    DEFAULT_BUSY_TIMEOUT,
    SQLITE_COMPANIONS,
    describe_error,
    open_rw,
    status_index_sql,
)
from outloop_cli.errors import AuditError
from outloop_cli.private_fs import check_private_file

_RUN_COLUMNS: Final = (
    "run_id", "workspace", "command", "started_at", "ended_at", "exit_code", "duration", "allowed",
    "denied", "errors", "sandbox", "head_hash", "event_count", "batch_id", "policy_hash",
)  # fmt: skip


@dataclass(frozen=True)
class RunRow:
    """One run as operators see it; ``incomplete`` means it never recorded an end (killed, or still live)."""

    run_id: str
    workspace: str
    command: list[str]
    started_at: float
    ended_at: float | None
    exit_code: int | None
    duration: float | None
    allowed: int
    denied: int
    errors: int
    sandbox: object
    head_hash: str | None
    event_count: int | None
    batch_id: str | None
    policy_hash: str | None
    incomplete: bool


@dataclass(frozen=True)
class EventRow:
    """One stored event, with ``detail`` decoded."""

    run_id: str
    seq: int
    ts: float
    kind: str
    workspace: str
    credential: str | None
    method: str | None
    host: str | None
    path: str | None
    decision: str | None
    reason: str | None
    rule: str | None
    status: int | None
    latency_ms: float | None
    bytes_in: int | None
    bytes_out: int | None
    request_seq: int | None
    error: str | None
    detail: dict[str, object] | None
    prev_hash: str
    hash: str


def loads_lenient(text: object) -> object:
    # A tampered cell must not crash the commands that would show it; verify reports the tampering.
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


_RUN_SELECT: Final = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
_EVENT_SELECT: Final = f"SELECT {', '.join((*EVENT_COLUMNS, 'hash'))} FROM events"


def _run_row(row: tuple[object, ...]) -> RunRow:
    values = dict(zip(_RUN_COLUMNS, row, strict=True))
    command = loads_lenient(values["command"])
    values["command"] = command if isinstance(command, list) else [str(command)]
    values["sandbox"] = loads_lenient(values["sandbox"])
    return RunRow(**values, incomplete=values["ended_at"] is None)  # type: ignore[arg-type]


def _event_row(row: tuple[object, ...]) -> EventRow:
    values = dict(zip((*EVENT_COLUMNS, "hash"), row, strict=True))
    if values["detail"] is not None:
        detail = loads_lenient(values["detail"])
        values["detail"] = detail if isinstance(detail, dict) else {"unparsable": values["detail"]}
    return EventRow(**values)  # type: ignore[arg-type]


# One HTTP status or a class of them, as an inclusive range: 401 is (401, 401), 5xx is (500, 599).
StatusRange: TypeAlias = tuple[int, int]


def _status_clause(column: str, statuses: Sequence[StatusRange]) -> tuple[str, list[object]]:
    clause = " OR ".join(f"{column} BETWEEN ? AND ?" for _ in statuses)
    return f"({clause})", [bound for pair in statuses for bound in pair]


def _failed_statuses(statuses: Sequence[StatusRange]) -> bool:
    return bool(statuses) and min(low for low, _ in statuses) >= 400


def _indexed(statuses: Sequence[StatusRange]) -> bool:
    """Whether events_unusual_status holds every event these statuses match: it leaves out 200, the usual answer."""
    return not any(low <= 200 <= high for low, high in statuses)


def _indexed_status_clause(table: str, statuses: Sequence[StatusRange]) -> tuple[str, list[object]]:
    """_status_clause with the term that lets events_unusual_status serve it, in each range's own branch: the planner
    takes the index for the branches of an OR only when each carries the term."""
    term = status_index_sql(table)
    clause = " OR ".join(f"({term} AND {table}status BETWEEN ? AND ?)" for _ in statuses)
    return f"({clause})", [bound for pair in statuses for bound in pair]


def list_runs(
    conn: sqlite3.Connection,
    *,
    limit: int = 20,
    workspace: str | None = None,
    failed: bool = False,
    statuses: Sequence[StatusRange] = (),
    batch_id: str | None = None,
) -> list[RunRow]:
    """Newest runs first. ``failed``: runs that exited non-zero, saw failed outcomes, or recorded no end;
    ``statuses``: runs where some request was answered with one of those statuses (by upstream or broker);
    ``batch_id``: the runs of one `run --each`."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("workspace", workspace), ("batch_id", batch_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if failed:
        clauses.append("(exit_code != 0 OR errors > 0 OR ended_at IS NULL)")
    if statuses:
        # A request row holds the broker's own answer (denials), a response row the upstream's: no join needed.
        # Any status but 200 comes from its index; 200, which nearly every request gets, is found at once among
        # each run's own events, newest run first.
        if _indexed(statuses):
            match, bounds = _indexed_status_clause("", statuses)
            clauses.append(f"run_id IN (SELECT run_id FROM events WHERE {match} AND kind IN ('request', 'response'))")
        else:
            match, bounds = _status_clause("e.status", statuses)
            clauses.append(f"EXISTS (SELECT 1 FROM events e WHERE e.run_id = runs.run_id AND {match} "
                           "AND e.kind IN ('request', 'response'))")
        params.extend(bounds)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"{_RUN_SELECT} {where} ORDER BY started_at DESC, run_id DESC LIMIT ?", [*params, limit]
    ).fetchall()
    return [_run_row(row) for row in rows]


def get_run(conn: sqlite3.Connection, run_id: str, *, workspace: str | None = None) -> RunRow | None:
    """One run by its full id, or the newest (of ``workspace``, if given) for ``"last"``."""
    if run_id == "last":
        runs = list_runs(conn, limit=1, workspace=workspace)
        return runs[0] if runs else None
    row = conn.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else _run_row(row)


_KNOWN_IDS: Final = "SELECT run_id FROM runs UNION SELECT run_id FROM pruned"


def runs_with_prefix(conn: sqlite3.Connection, prefix: str, *, limit: int) -> list[str]:
    """Full ids (of runs and pruned runs) starting with ``prefix``, at most ``limit`` of them, sorted."""
    if not prefix.isalnum() or not prefix.isascii():
        return []  # ids are Crockford base32: anything else matches nothing (and is no GLOB pattern)
    rows = conn.execute(
        f"SELECT run_id FROM ({_KNOWN_IDS}) WHERE run_id GLOB ? ORDER BY run_id LIMIT ?", (prefix + "*", limit)
    ).fetchall()
    return [str(row[0]) for row in rows]


def unique_prefix_length(conn: sqlite3.Connection, run_ids: Collection[str], *, minimum: int) -> int:
    """The shortest length, at least ``minimum``, at which each of ``run_ids`` has a prefix no other known run
    shares, so a shortened id shown in a listing can be typed back in (like git's abbreviated hashes)."""
    length = minimum
    for run_id in run_ids:
        for table in ("runs", "pruned"):
            for neighbour in conn.execute(
                f"SELECT (SELECT max(run_id) FROM {table} WHERE run_id < :id), "
                f"(SELECT min(run_id) FROM {table} WHERE run_id > :id)",
                {"id": run_id},
            ).fetchone():
                if isinstance(neighbour, str):
                    shared = next((i for i, (a, b) in enumerate(zip(run_id, neighbour, strict=False)) if a != b),
                                  min(len(run_id), len(neighbour)))
                    length = max(length, shared + 1)
    return min(length, max((len(run_id) for run_id in run_ids), default=length))


def run_events(
    conn: sqlite3.Connection, run_id: str, *, limit: int | None = None, after_seq: int = -1
) -> list[EventRow]:
    """A run's events in chain order; ``after_seq`` lets ``audit tail`` poll for what is new."""
    rows = conn.execute(
        f"{_EVENT_SELECT} WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (run_id, after_seq, -1 if limit is None else limit),
    ).fetchall()
    return [_event_row(row) for row in rows]


@dataclass(frozen=True)
class Exchange:
    """An event as a listing shows it: a request joined to the response event that recorded its outcome.

    ``response`` is None for denials (the broker answered: the request row holds that status), for routes
    answered without going upstream, for requests still in flight, and for every other kind of event.
    """

    event: EventRow
    response: EventRow | None

    @property
    def status(self) -> int | None:
        return self.response.status if self.response is not None else self.event.status

    @property
    def result(self) -> str | None:
        """ok, error, denied, rate_limited, or pending (allowed, no outcome recorded); None for non-requests."""
        event, response = self.event, self.response
        if event.kind != "request":
            return None
        if event.decision == "deny":
            return "rate_limited" if event.status == 429 else "denied"
        if response is not None:
            return "error" if is_error(response.status, response.error) else "ok"
        return "ok" if event.status is not None else "pending"


_OUTCOME_JOIN: Final = (
    "LEFT JOIN events r ON q.kind = 'request' AND r.run_id = q.run_id AND r.request_seq = q.seq AND r.kind = 'response'"
)
_EXCHANGE_SELECT: Final = (
    f"SELECT {', '.join(f'q.{name}' for name in (*EVENT_COLUMNS, 'hash'))}, "
    f"{', '.join(f'r.{name}' for name in (*EVENT_COLUMNS, 'hash'))} FROM events q {_OUTCOME_JOIN}"
)
_NEWEST_FIRST: Final = "ORDER BY q.ts DESC, q.rowid DESC"
_WIDTH: Final = len(EVENT_COLUMNS) + 1
# The requests (by rowid) whose response event ``a`` matches a condition appended to this.
_ANSWERED_BY: Final = (
    "SELECT p.rowid FROM events a JOIN events p ON p.run_id = a.run_id AND p.seq = a.request_seq "
    "AND p.kind = 'request'"
)


def _exchange(row: tuple[object, ...]) -> Exchange:
    response = row[_WIDTH:]
    return Exchange(_event_row(row[:_WIDTH]), None if response[0] is None else _event_row(response))


def query_exchanges(
    conn: sqlite3.Connection,
    *,
    workspace: str | None = None,
    credential: str | None = None,
    decision: str | None = None,
    since: float | None = None,
    until: float | None = None,
    failed: bool = False,
    statuses: Sequence[StatusRange] = (),
    limit: int | None = 100,
) -> list[Exchange]:
    """Requests across runs with their outcomes, newest first.

    ``failed``: allowed requests whose outcome failed (the runs' ``errors``); ``statuses``: requests answered
    with one of those statuses, by the upstream or (denials, broker errors) by the broker.
    """
    where, params = _event_filter(workspace, credential, decision, since, until, requests_only=True, table="q.")
    clauses = [where]
    source = "FROM events q"
    # Failures are the exception: they are found through their own indexes (events_failed, events_unusual_status),
    # then their requests by primary key, rather than by walking every request newest first until enough match
    # (seconds on a big log when few or none do). Successes are the rule, and the walk finds them at once.
    if failed:
        source += " JOIN events f ON f.run_id = q.run_id AND f.request_seq = q.seq"
        clauses.append(f"q.decision = 'allow' AND f.kind = 'response' AND {error_sql('f.')}")
    if _failed_statuses(statuses):
        match, bounds = _indexed_status_clause("", statuses)
        answered, more = _indexed_status_clause("a.", statuses)
        clauses.append(f"(q.rowid IN (SELECT rowid FROM events WHERE {match} AND kind = 'request') "
                       f"OR q.rowid IN ({_ANSWERED_BY} WHERE {answered}))")
        params.extend([*bounds, *more])
    elif statuses:
        match, bounds = _status_clause("COALESCE(r.status, q.status)", statuses)
        clauses.append(match)
        params.extend(bounds)
        source += f" {_OUTCOME_JOIN}"
    where = " AND ".join(clauses)
    if failed or _failed_statuses(statuses):
        # Found through their index, the matches must be sorted, and there may be thousands: sort bare rowids, then
        # join and read whole only those shown (sorting thousands of joined rows cost tens of ms).
        where = f"q.rowid IN (SELECT q.rowid {source} WHERE {where} {_NEWEST_FIRST} LIMIT ?)"
        params.append(-1 if limit is None else limit)
    rows = conn.execute(
        f"{_EXCHANGE_SELECT} WHERE {where} {_NEWEST_FIRST} LIMIT ?", [*params, -1 if limit is None else limit]
    ).fetchall()
    return [_exchange(row) for row in rows]


def run_exchanges(conn: sqlite3.Connection, run_id: str, *, limit: int | None = None) -> list[Exchange]:
    """A run's events in chain order, each request carrying its outcome and responses not listed on their own
    (a response whose request is gone, which only tampering does, is still listed)."""
    rows = conn.execute(
        f"{_EXCHANGE_SELECT} WHERE q.run_id = ? AND NOT (q.kind = 'response' AND EXISTS (SELECT 1 FROM events p "
        "WHERE p.run_id = q.run_id AND p.seq = q.request_seq AND p.kind = 'request')) ORDER BY q.seq LIMIT ?",
        (run_id, -1 if limit is None else limit),
    ).fetchall()
    return [_exchange(row) for row in rows]


def iter_events(
    conn: sqlite3.Connection,
    *,
    workspace: str | None = None,
    since: float | None = None,
    until: float | None = None,
    run_id: str | None = None,
) -> Iterator[EventRow]:
    """Every event of every kind, oldest first, streamed from the cursor so an export never sits in memory."""
    where, params = _event_filter(workspace, None, None, since, until)
    if run_id is not None:
        where = " AND ".join(filter(None, (where, "run_id = ?")))
        params.append(run_id)
    for row in conn.execute(f"{_EVENT_SELECT} {_where(where)} ORDER BY ts, rowid", params):
        yield _event_row(row)


def _where(condition: str) -> str:
    return f"WHERE {condition}" if condition else ""


def _event_filter(
    workspace: str | None,
    credential: str | None,
    decision: str | None,
    since: float | None,
    until: float | None,
    *,
    requests_only: bool = False,
    table: str = "",
) -> tuple[str, list[object]]:
    """The conditions the read helpers share, columns prefixed with ``table``; returned without the WHERE keyword.

    Each filter has an index ending in ts (see schema.py). A partial one (denials, requests by credential) serves a
    query only when the planner can prove its condition from the statement, which it does not reliably do from bound
    values (not from ``kind IN (?)``, for one), so decision and kind are written as literals.
    """
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("workspace", workspace), ("credential", credential)):
        if value is not None:
            clauses.append(f"{table}{column} = ?")
            params.append(value)
    if decision is not None:
        check_decision(decision)  # one of two fixed words, so safe as a literal
        clauses.append(f"{table}decision = '{decision}'")
    if since is not None:
        clauses.append(f"{table}ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append(f"{table}ts < ?")
        params.append(until)
    if requests_only:
        clauses.append(f"{table}kind = 'request'")
    return " AND ".join(clauses), params


def prune(db_path: Path, *, older_than: float, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> int:
    """Delete runs that ended before ``older_than`` (epoch seconds) with their events; return how many.

    Each leaves a ``pruned`` marker with its count and head hash, so verify can tell pruning from deletion.
    Unfinished runs are kept: they may still be live.
    """
    if not check_private_file(db_path, companions=SQLITE_COMPANIONS):
        raise AuditError(f"no audit database at {db_path} yet: run `outloop run` first")
    conn = open_rw(db_path, busy_timeout)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = conn.execute(
                "INSERT INTO pruned (run_id, workspace, started_at, ended_at, event_count, head_hash, "
                "pruned_at) SELECT run_id, workspace, started_at, ended_at, event_count, head_hash, ? "
                "FROM runs WHERE ended_at < ?",
                (now(), older_than),
            ).rowcount
            conn.execute(
                "DELETE FROM events WHERE run_id IN (SELECT run_id FROM runs WHERE ended_at < ?)",
                (older_than,),
            )
            conn.execute("DELETE FROM runs WHERE ended_at < ?", (older_than,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise AuditError(f"cannot prune the audit database at {db_path}: {describe_error(exc, busy_timeout)}") from None
    finally:
        conn.close()
    return count
