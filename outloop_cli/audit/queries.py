"""The operator's view of the audit log: run states, JSON shapes, and following a live run.

The store answers "what is recorded"; this adds what an operator asks next: is that run still going, or was it
killed before it could record its end, and how was it sandboxed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from outloop_cli.audit.store import EventRow, RunRow, get_run, list_runs, open_readonly, run_events
from outloop_cli.errors import UsageError
from outloop_cli.home import audit_db_path, outloop_home
from outloop_cli.timespec import iso_time

RunState = Literal["ended", "live", "no end"]
POLL_SECONDS = 0.2
_FOLLOW_BATCH = 500
# A pid is the run's outloop only if that process existed when the run started; allow for clock granularity.
_PID_START_SLACK = 2.0


@dataclass(frozen=True)
class RunView:
    """A run plus what the operator needs to read it: live, ended, or never recorded an end (kill -9)."""

    run: RunRow
    state: RunState
    sandbox: str


def outloop_pid(conn: sqlite3.Connection, run_id: str) -> int | None:
    """The pid of the `outloop run` process, as its run_start event recorded it."""
    events = run_events(conn, run_id, limit=1)
    detail = events[0].detail if events else None
    pid = detail.get("pid") if detail else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def process_alive(pid: int | None, started_at: float) -> bool:
    """True when `pid` runs and is old enough to be the process that started the run (not a reused pid)."""
    if pid is None:
        return False
    import psutil  # only runs without an end record need it, so listings of finished runs skip the import

    try:
        return psutil.Process(pid).create_time() <= started_at + _PID_START_SLACK
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def run_state(conn: sqlite3.Connection, run: RunRow) -> RunState:
    if not run.incomplete:
        return "ended"
    return "live" if process_alive(outloop_pid(conn, run.run_id), run.started_at) else "no end"


def sandbox_status(layers: object) -> str:
    """One word for a listing: which layers were NOT in force, an open network, or "ok"."""
    if not isinstance(layers, dict) or not layers:
        return "unknown"
    weak = [str(name) for name, value in layers.items() if "NOT" in str(value)]
    if weak:
        return "NOT " + ",".join(weak)
    if str(layers.get("network", "")).startswith("open"):
        return "open network"
    return "ok"


def view(conn: sqlite3.Connection, run: RunRow) -> RunView:
    return RunView(run, run_state(conn, run), sandbox_status(run.sandbox))


def recent_runs(conn: sqlite3.Connection, *, limit: int, workspace: str | None = None,
                batch_id: str | None = None) -> list[RunView]:
    """Newest first, each with its state; liveness is probed only for runs without an end record."""
    return [view(conn, run) for run in list_runs(conn, limit=limit, workspace=workspace, batch_id=batch_id)]


def find_run(conn: sqlite3.Connection, run_id: str) -> RunView:
    """RUN_ID or "last"; an unknown id is a usage error that says how to find ids."""
    run = get_run(conn, run_id)
    if run is None:
        if run_id == "last":
            raise UsageError("the audit database holds no runs yet")
        raise UsageError(f"no run {run_id!r} in the audit database; `outloop audit` lists recent run ids")
    return view(conn, run)


def count_events(conn: sqlite3.Connection, run_id: str) -> int:
    row = conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (run_id,)).fetchone()
    return int(row[0])


def run_record(item: RunView) -> dict[str, object]:
    """The JSON shape of a run in `audit --json` and `audit show --json`."""
    record = asdict(item.run)
    record.update(
        started=iso_time(item.run.started_at),
        ended=iso_time(item.run.ended_at),
        state=item.state,
        sandbox_status=item.sandbox,
    )
    return record


def event_record(event: EventRow) -> dict[str, object]:
    """The JSON shape of an event, also used by `audit export --format jsonl`."""
    record = asdict(event)
    record["time"] = iso_time(event.ts)
    return record


# --------------------------------------------------------------------------------------------------
# Following a live run


def follow(
    conn: sqlite3.Connection,
    run: RunRow,
    *,
    after_seq: int,
    poll: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[EventRow]:
    """Yield the run's events after `after_seq` as they are committed; stop after run_end.

    Also stops when the run's outloop process is gone without an end record (killed), after one last read so
    events committed just before it died are not missed; the caller tells the two endings apart by the last
    event's kind.
    """
    pid = outloop_pid(conn, run.run_id)
    gone = False
    while True:
        events = run_events(conn, run.run_id, after_seq=after_seq, limit=_FOLLOW_BATCH)
        for event in events:
            yield event
            after_seq = event.seq
            if event.kind == "run_end":
                return
        if events:
            continue
        if gone:
            return
        gone = not process_alive(pid, run.started_at)
        if not gone:
            sleep(poll)


def live_or_next_run(
    conn: sqlite3.Connection,
    *,
    workspace: str | None = None,
    poll: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    on_wait: Callable[[], None] = lambda: None,
) -> RunRow:
    """The newest run that is still live, else the next run to start (waiting for it, like `tail -f`)."""
    newest = list_runs(conn, limit=50, workspace=workspace)
    for run in newest:
        if run.incomplete and run_state(conn, run) == "live":
            return run
    seen = {run.run_id for run in newest}
    since = newest[0].started_at if newest else 0.0
    on_wait()
    while True:
        sleep(poll)
        fresh = [run for run in list_runs(conn, limit=50, workspace=workspace)
                 if run.started_at >= since and run.run_id not in seen]
        if fresh:
            return fresh[-1]  # the oldest of the new ones, so none is skipped when several start at once


def run_errors(conn: sqlite3.Connection, run_id: str) -> int:
    """Allowed requests that ended in an error (upstream unreachable, timeout, cut off...), for batch summaries."""
    row = conn.execute("SELECT count(*) FROM events WHERE run_id = ? AND kind = 'response' AND error IS NOT NULL",
                       (run_id,)).fetchone()
    return int(row[0])


@contextlib.contextmanager
def operator_database() -> Iterator[sqlite3.Connection]:
    """$OUTLOOP_HOME/audit.db, read-only, for the operator commands."""
    conn = open_readonly(audit_db_path(outloop_home()))
    try:
        yield conn
    finally:
        conn.close()
