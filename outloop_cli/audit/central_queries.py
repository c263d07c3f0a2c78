"""The operator's queries across every host that ships: the same runs, events and filters, plus the host.

Runs are read from their run_start and run_end events (the central copy keeps no mutable runs table); a run
whose end has not arrived is shown with what its shipped events say so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg

from outloop_cli.audit.central_db import CHAIN_COLUMNS, EVENTS
from outloop_cli.audit.chain import error_sql
from outloop_cli.audit.queries import RunState, RunView, sandbox_status
from outloop_cli.audit.store import (
    EventRow,
    Exchange,
    RunRow,
    StatusRange,
    _event_filter,
    _status_clause,
    loads_lenient,
)
from outloop_cli.errors import UsageError


@dataclass(frozen=True)
class HostRun:
    host_id: str
    view: RunView


@dataclass(frozen=True)
class HostExchange:
    host_id: str
    exchange: Exchange


# A request with the response event that recorded its outcome, as the local listings join them (store.py).
_EXCHANGE_SELECT: Final = (
    f"SELECT q.host_id, {', '.join(f'q.{name}' for name in CHAIN_COLUMNS)}, "
    f"{', '.join(f'r.{name}' for name in CHAIN_COLUMNS)} FROM {EVENTS} q LEFT JOIN {EVENTS} r "
    "ON q.kind = 'request' AND r.host_id = q.host_id AND r.run_id = q.run_id AND r.request_seq = q.seq "
    "AND r.kind = 'response'"
)
# Runs read per round trip while `--failed` judges them (most runs end well, so a page rarely fills the limit).
_RUN_PAGE: Final = 500
# For a run without its run_end, the counts the runs row would hold, from its shipped events.
_RUN_SELECT: Final = f"""
    SELECT s.host_id, s.run_id, s.workspace, s.ts, s.detail, e.ts, e.detail, e.hash,
        CASE WHEN e.run_id IS NULL THEN (
            SELECT json_build_array(count(*) FILTER (WHERE x.kind = 'request' AND x.decision = 'allow'),
                                    count(*) FILTER (WHERE x.kind = 'request' AND x.decision = 'deny'),
                                    count(*) FILTER (WHERE x.kind = 'response' AND {error_sql('x.')}),
                                    count(*), (array_agg(x.hash ORDER BY x.seq DESC))[1])::text
            FROM {EVENTS} x WHERE x.host_id = s.host_id AND x.run_id = s.run_id) END
    FROM {EVENTS} s
    LEFT JOIN {EVENTS} e ON e.host_id = s.host_id AND e.run_id = s.run_id AND e.kind = 'run_end'
    WHERE s.kind = 'run_start'"""


def recent_runs(central: psycopg.Connection, *, limit: int, workspace: str | None = None, failed: bool = False,
                statuses: Sequence[StatusRange] = (), batch_id: str | None = None) -> list[HostRun]:
    """Newest first across hosts; a run without a shipped end is "no end" (live or killed on its host).

    ``statuses``: runs where some request was answered with one of those statuses, as locally. ``failed``: runs
    that exited non-zero, saw failed requests, or have no shipped end; ``batch_id``: the runs of one `run --each`.
    The exit code, counts and batch live in the run events' JSON, so those two are judged here, page by page,
    rather than by casting text in SQL (a tampered detail would then fail the whole listing instead of showing
    as unparsable).
    """
    clauses: list[str] = ["TRUE"]
    params: list[object] = []
    if workspace is not None:
        clauses.append("s.workspace = %s")
        params.append(workspace)
    if statuses:
        match, bounds = _placeholders(*_status_clause("x.status", statuses))
        clauses.append(f"EXISTS (SELECT 1 FROM {EVENTS} x WHERE x.host_id = s.host_id AND x.run_id = s.run_id "
                       f"AND x.kind IN ('request', 'response') AND {match})")
        params.extend(bounds)
    query = f"{_RUN_SELECT} AND {' AND '.join(clauses)} ORDER BY s.ts DESC, s.run_id DESC LIMIT %s OFFSET %s"
    judged = failed or batch_id is not None
    found: list[HostRun] = []
    page = max(limit, _RUN_PAGE) if judged else limit
    offset = 0
    while len(found) < limit:
        rows = central.execute(query, [*params, page, offset]).fetchall()
        found.extend(run for run in map(_host_run, rows)
                     if (not failed or _run_failed(run.view)) and batch_id in (None, run.view.run.batch_id))
        if len(rows) < page:
            break
        offset += page
    return found[:limit]


def _run_failed(item: RunView) -> bool:
    run = item.run
    return run.incomplete or run.exit_code != 0 or run.errors > 0


def _placeholders(clause: str, params: list[object]) -> tuple[str, list[object]]:
    """A local (SQLite) condition for psycopg: the conditions hold column names, placeholders and fixed words only."""
    return clause.replace("?", "%s"), params


def find_run(central: psycopg.Connection, run_id: str) -> HostRun:
    """RUN_ID (or a unique prefix of it), or "last"; one id shipped by two hosts is refused as ambiguous."""
    if run_id == "last":
        runs = recent_runs(central, limit=1)
        if not runs:
            raise UsageError("the central audit database holds no runs yet")
        return runs[0]
    pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = central.execute(f"{_RUN_SELECT} AND s.run_id LIKE %s ORDER BY s.run_id LIMIT 3", [pattern]).fetchall()
    if not rows:
        raise UsageError(f"no run {run_id!r} in the central audit database; `outloop audit --central` lists them")
    if len(rows) > 1:
        found = ", ".join(f"{row[1]} on {row[0]}" for row in rows)
        raise UsageError(f"{run_id!r} matches more than one central run ({found}); give more of the id")
    return _host_run(rows[0])


def run_exchanges(central: psycopg.Connection, run: HostRun, *, limit: int) -> tuple[list[Exchange], int]:
    """A run's first ``limit`` events in chain order, each request carrying its outcome, and how many it has."""
    key = (run.host_id, run.view.run.run_id)
    rows = central.execute(
        f"{_EXCHANGE_SELECT} WHERE q.host_id = %s AND q.run_id = %s AND NOT (q.kind = 'response' AND EXISTS "
        f"(SELECT 1 FROM {EVENTS} p WHERE p.host_id = q.host_id AND p.run_id = q.run_id AND p.seq = q.request_seq "
        "AND p.kind = 'request')) ORDER BY q.seq LIMIT %s", [*key, limit]).fetchall()
    total = central.execute(f"SELECT count(*) FROM {EVENTS} WHERE host_id = %s AND run_id = %s", key).fetchone()
    return [_exchange(row[1:]) for row in rows], int(total[0]) if total else 0


def query_exchanges(
    central: psycopg.Connection,
    *,
    workspace: str | None = None,
    credential: str | None = None,
    decision: str | None = None,
    since: float | None = None,
    until: float | None = None,
    failed: bool = False,
    statuses: Sequence[StatusRange] = (),
    limit: int = 100,
) -> list[HostExchange]:
    """Requests across hosts and runs with their outcomes, newest first; the local `audit events` filters.

    ``failed``: allowed requests whose outcome failed; ``statuses``: requests answered with one of those
    statuses, by the upstream (the response event) or by the broker (the request event of a denial).
    """
    clause, params = _placeholders(*_event_filter(workspace, credential, decision, since, until, requests_only=True,
                                                  table="q."))
    clauses = [clause]
    if failed:
        clauses.append(f"q.decision = 'allow' AND r.run_id IS NOT NULL AND {error_sql('r.')}")
    if statuses:
        match, bounds = _placeholders(*_status_clause("COALESCE(r.status, q.status)", statuses))
        clauses.append(match)
        params.extend(bounds)
    rows = central.execute(f"{_EXCHANGE_SELECT} WHERE {' AND '.join(clauses)} "
                           "ORDER BY q.ts DESC, q.host_id, q.run_id, q.seq DESC LIMIT %s", [*params, limit]).fetchall()
    return [HostExchange(str(row[0]), _exchange(row[1:])) for row in rows]


def _exchange(row: tuple[object, ...]) -> Exchange:
    width = len(CHAIN_COLUMNS)
    response = row[width:]
    return Exchange(_event(row[:width]), None if response[0] is None else _event(response))


def _event(row: tuple[object, ...]) -> EventRow:
    values = dict(zip(CHAIN_COLUMNS, row, strict=True))
    if values["detail"] is not None:
        detail = loads_lenient(values["detail"])
        values["detail"] = detail if isinstance(detail, dict) else {"unparsable": values["detail"]}
    return EventRow(**values)  # type: ignore[arg-type]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(text: object) -> dict[str, object]:
    value = loads_lenient(text)
    return value if isinstance(value, dict) else {}


def _host_run(row: tuple[object, ...]) -> HostRun:
    host_id, run_id, workspace, started_at, start_text, ended_at, end_text, end_hash, partial = row
    start, end = _dict(start_text), _dict(end_text)
    command = start.get("command")
    counts = loads_lenient(partial) if partial is not None else None
    if isinstance(counts, list) and len(counts) == 5:
        allowed, denied, errors, event_count, head = counts
    else:
        allowed, denied, errors, event_count, head = (end.get("allowed"), end.get("denied"), end.get("errors"),
                                                      _plus_one(end.get("event_count")), end_hash)
    run = RunRow(
        run_id=str(run_id), workspace=str(workspace),
        command=[str(part) for part in command] if isinstance(command, list) else [str(command)],
        started_at=float(started_at),  # type: ignore[arg-type]
        ended_at=float(ended_at) if isinstance(ended_at, float) else None,
        exit_code=_int(end.get("exit_code")), duration=_float(end.get("duration")),
        allowed=_int(allowed) or 0, denied=_int(denied) or 0, errors=_int(errors) or 0, sandbox=start.get("sandbox"),
        head_hash=str(head) if head is not None else None, event_count=_int(event_count),
        batch_id=_text(start.get("batch_id")), policy_hash=_text(start.get("policy_hash")),
        incomplete=ended_at is None,
    )
    state: RunState = "ended" if ended_at is not None else "no end"
    return HostRun(str(host_id), RunView(run, state, sandbox_status(run.sandbox)))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _plus_one(value: object) -> int | None:
    # run_end records the count before itself; the runs row (and so the listing) counts run_end too.
    count = _int(value)
    return None if count is None else count + 1
