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

from outloop_cli.audit.schema import open_readonly
from outloop_cli.audit.store import (
    EventRow,
    Exchange,
    RunRow,
    StatusRange,
    get_run,
    list_runs,
    run_events,
    runs_with_prefix,
    unique_prefix_length,
)
from outloop_cli.errors import EXIT_AMBIGUOUS, UsageError
from outloop_cli.home import audit_db_path, outloop_home
from outloop_cli.timespec import iso_time

RunState = Literal["ended", "live", "no end"]
# Shortened run ids are never shorter than this: 8 characters of a ULID change every second or so, so runs
# started minutes apart differ within them (like git's 7-character abbreviations).
SHORT_ID_MIN = 8
MIN_PREFIX = 4  # a shorter prefix names too many runs to be what anyone meant
_CANDIDATES_SHOWN = 10
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


def recent_runs(conn: sqlite3.Connection, *, limit: int, workspace: str | None = None, failed: bool = False,
                statuses: list[StatusRange] | None = None, batch_id: str | None = None) -> list[RunView]:
    """Newest first, each with its state; liveness is probed only for runs without an end record.

    ``failed`` keeps runs that exited non-zero, saw failed requests, or were killed before recording their end
    (a run still live is not failed). ``batch_id``: only the runs of one `run --each`.
    """
    runs = [view(conn, run) for run in list_runs(conn, limit=limit, workspace=workspace, failed=failed,
                                                 statuses=statuses or (), batch_id=batch_id)]
    return [item for item in runs if item.state != "live"] if failed else runs


class AmbiguousRunId(UsageError):
    """A shortened run id that several runs start with."""

    exit_code = EXIT_AMBIGUOUS


def resolve_run_id(conn: sqlite3.Connection, text: str, *, workspace: str | None = None) -> str:
    """The full id for "last" (the newest run, of ``workspace`` if given), a full id, or a unique prefix of one.

    Pruned runs count too, so `audit verify` can name them.
    """
    if text == "last":
        run = get_run(conn, "last", workspace=workspace)
        if run is None:
            raise UsageError("the audit database holds no runs yet"
                             + (f" for workspace {workspace!r}" if workspace else ""))
        return run.run_id
    wanted = text.strip().upper()
    if get_run(conn, wanted) is not None:
        return wanted
    found = runs_with_prefix(conn, wanted, limit=_CANDIDATES_SHOWN + 1) if len(wanted) >= MIN_PREFIX else []
    if len(found) == 1:
        return found[0]
    if not found:
        hint = f" (a prefix needs at least {MIN_PREFIX} characters)" if len(wanted) < MIN_PREFIX else ""
        raise UsageError(f"no run {text!r} in the audit database{hint}; `outloop audit` lists recent run ids")
    more = ", and more" if len(found) > _CANDIDATES_SHOWN else ""
    raise AmbiguousRunId(f"run id {text!r} is ambiguous: it begins {', '.join(found[:_CANDIDATES_SHOWN])}{more}; "
                         "give more characters")


def find_run(conn: sqlite3.Connection, run_id: str, *, workspace: str | None = None) -> RunView:
    """RUN_ID (or a unique prefix) or "last"; an unknown id is a usage error that says how to find ids."""
    full = resolve_run_id(conn, run_id, workspace=workspace)
    run = get_run(conn, full)
    if run is None:
        raise UsageError(f"run {full} was pruned: only its marker is left (`outloop audit verify {full}`)")
    return view(conn, run)


def short_ids(conn: sqlite3.Connection, run_ids: list[str]) -> dict[str, str]:
    """Each id cut to one length at which every one of them is still unique in the database."""
    length = unique_prefix_length(conn, run_ids, minimum=SHORT_ID_MIN)
    return {run_id: run_id[:length] for run_id in run_ids}


def failure_reasons(conn: sqlite3.Connection, item: RunView) -> list[str]:
    """Why a run did not end well, most telling first; empty for a clean exit 0 without failed requests."""
    run = item.run
    end = run_events(conn, run.run_id, after_seq=(run.event_count or 1) - 2, limit=1) if not run.incomplete else []
    detail = (end[0].detail or {}) if end and end[0].kind == "run_end" else {}
    reasons = []
    if detail.get("started") is False:
        reasons.append(f"never started: {detail.get('error', 'no reason recorded')}")
    elif item.state == "no end":
        reasons.append("no end record: outloop was killed (kill -9, OOM, reboot) before the run ended")
    if detail.get("timed_out"):
        reasons.append("timed out")
    if detail.get("limit_hit"):
        reasons.append(f"limit hit: {detail['limit_hit']}")
    if isinstance(detail.get("signal"), int) and detail["signal"]:
        reasons.append(f"killed by signal {detail['signal']}")
    if run.exit_code and not reasons:
        reasons.append(f"the command exited with {run.exit_code}")
    if run.errors:
        reasons.append(f"{run.errors} of {run.allowed} allowed requests failed (upstream error, timeout or refusal)")
    return reasons


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


def exchange_record(exchange: Exchange) -> dict[str, object]:
    """A request's JSON in `audit events` and `audit show`: the stored event as exported, plus ``result`` and the
    ``outcome`` event (seq, status, latency_ms, bytes_in sent upstream, bytes_out received, error) when there is one.
    """
    record = event_record(exchange.event)
    if exchange.event.kind == "request":
        record["result"] = exchange.result
        response = exchange.response
        record["outcome"] = None if response is None else {
            "seq": response.seq, "time": iso_time(response.ts), "status": response.status,
            "latency_ms": response.latency_ms, "bytes_in": response.bytes_in, "bytes_out": response.bytes_out,
            "error": response.error, "hash": response.hash}
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


@contextlib.contextmanager
def operator_database(*, missing_ok: bool = True) -> Iterator[sqlite3.Connection]:
    """The audit DB read-only; before the first run it reads as empty, so listings print nothing, not an error."""
    conn = open_readonly(audit_db_path(outloop_home()), missing_ok=missing_ok)
    try:
        yield conn
    finally:
        conn.close()
