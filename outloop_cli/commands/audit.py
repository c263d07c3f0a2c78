"""`outloop audit`: what ran, what it called, what was denied, and whether anyone edited the log.

Every subcommand opens audit.db read-only (except `prune`) and prints; the queries live in outloop_cli.audit.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated

import typer

from outloop_cli.audit.export import FORMATS, write_events
from outloop_cli.audit.queries import (
    RunView,
    count_events,
    event_record,
    find_run,
    follow,
    live_or_next_run,
    recent_runs,
    run_record,
)
from outloop_cli.audit.store import EventRow, iter_events, open_readonly, prune, query_events, run_events
from outloop_cli.audit.verify import RunVerdict, verify_all, verify_run
from outloop_cli.commands.options import JsonFlag, WorkspaceFilter
from outloop_cli.commands.output import print_json
from outloop_cli.commands.tables import note, print_pairs, print_table
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, OutloopError, UsageError
from outloop_cli.home import audit_db_path, outloop_home
from outloop_cli.timespec import format_time, parse_age, parse_point
from outloop_cli.units import format_bytes, format_duration

app = typer.Typer(
    help="Read the audit log. Without a subcommand: recent runs, newest first (NO END marks a run that never "
         "recorded its end, e.g. after kill -9). Subcommands: one run, events across runs, a live run, tamper "
         "checks, export and pruning.",
    rich_markup_mode=None,
)
RunIdArgument = Annotated[str, typer.Argument(help="A run id from `outloop audit`, or `last`.", show_default=False)]
SinceOption = Annotated[str | None, typer.Option("--since", help="From this time: \"24h\", \"7d\" (ago) or "
                                                 "\"2025-01-31[T18:00]\".", show_default=False)]
UntilOption = Annotated[str | None, typer.Option("--until", help="Before this time, same forms as --since.",
                                                 show_default=False)]
COMMAND_WIDTH = 40
CentralFlag = Annotated[bool, typer.Option("--central", help="Query the central audit database ([audit.central] "
                                           "in config.toml) across every host that ships to it.")]
RUN_HEADER = ("started", "run", "workspace", "command", "exit", "duration", "allowed", "denied", "sandbox", "state")
EVENT_HEADER = ("time", "run", "workspace", "kind", "credential", "request", "decision", "reason", "status", "ms",
                "in", "out")


class Decision(StrEnum):
    allow = "allow"
    deny = "deny"


class ExportFormat(StrEnum):
    jsonl = FORMATS[0]
    csv = FORMATS[1]


def register(root: typer.Typer) -> None:
    from outloop_cli.commands import audit_central

    audit_central.register(app)
    root.add_typer(app, name="audit")


@contextlib.contextmanager
def _database() -> Iterator[sqlite3.Connection]:
    conn = open_readonly(audit_db_path(outloop_home()))
    try:
        yield conn
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# audit (recent runs)


@app.callback(invoke_without_command=True)
def recent(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N runs.")] = 20,
    workspace: WorkspaceFilter = None,
    central: CentralFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Recent runs, newest first; NO END marks a run that never recorded its end (killed, e.g. kill -9)."""
    if ctx.invoked_subcommand is not None:
        return
    if central:
        from outloop_cli.commands import audit_central

        audit_central.recent(limit, workspace, as_json)
        return
    with _database() as conn:
        runs = recent_runs(conn, limit=limit, workspace=workspace)
    if as_json:
        print_json([run_record(item) for item in runs])
        return
    if not runs:
        note("no runs recorded yet" + (f" for workspace {workspace!r}" if workspace else ""))
        return
    print_table(RUN_HEADER, [_run_cells(item) for item in runs], right=("exit", "duration", "allowed", "denied"),
                whole=("started", "run"))


def _run_cells(item: RunView) -> list[object]:
    run = item.run
    command = " ".join(run.command)
    if len(command) > COMMAND_WIDTH:
        command = command[: COMMAND_WIDTH - 3] + "..."
    duration = format_duration(run.duration) if run.duration is not None else None
    return [format_time(run.started_at), run.run_id, run.workspace, command, run.exit_code, duration,
            run.allowed, run.denied, item.sandbox, item.state.upper() if item.state == "no end" else item.state]


# --------------------------------------------------------------------------------------------------
# audit show


@app.command("show")
def show(
    run_id: RunIdArgument,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most the first N events.")] = 200,
    central: CentralFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """One run: its header, then its events in order."""
    if central:
        from outloop_cli.commands import audit_central

        audit_central.show(run_id, limit, as_json)
        return
    with _database() as conn:
        item = find_run(conn, run_id)
        events = run_events(conn, item.run.run_id, limit=limit)
        total = count_events(conn, item.run.run_id)
    if as_json:
        print_json({**run_record(item), "events_total": total, "events": [event_record(e) for e in events]})
        return
    _print_run(item, events, total)


def _print_run(item: RunView, events: list[EventRow], total: int) -> None:
    run = item.run
    print_pairs([
        ("run", run.run_id), ("workspace", run.workspace), ("command", " ".join(run.command)),
        ("started", format_time(run.started_at)), ("ended", format_time(run.ended_at)),
        ("state", item.state), ("exit", run.exit_code),
        ("duration", format_duration(run.duration) if run.duration is not None else None),
        ("requests", f"{run.allowed} allowed, {run.denied} denied"),
        ("sandbox", ", ".join(f"{k}: {v}" for k, v in run.sandbox.items()) if isinstance(run.sandbox, dict)
         else run.sandbox),
        ("events", f"{total}, head {(run.head_hash or '')[:16]}"),
    ])
    sys.stdout.write("\n")
    print_table(("seq", "time", "kind", "credential", "request", "decision", "reason", "status", "ms", "in",
                 "out"), [_event_cells(e, with_run=False) for e in events],
                right=("seq", "status", "ms", "in", "out"), whole=("seq", "time"))
    if total > len(events):
        note(f"{total - len(events)} more events not shown; use --limit {total} or --json")


def _event_cells(event: EventRow, *, with_run: bool) -> list[object]:
    request = f"{event.method} {event.path}" if event.method else _detail_summary(event)
    sizes = [format_bytes(event.bytes_in) if event.bytes_in is not None else None,
             format_bytes(event.bytes_out) if event.bytes_out is not None else None]
    when = format_time(event.ts) if with_run else format_time(event.ts)[11:]
    first = [when, event.run_id, event.workspace] if with_run else [event.seq, when]
    latency = f"{event.latency_ms:.0f}" if event.latency_ms is not None else None
    return [*first, event.kind, event.credential, request, event.decision,
            event.reason if not event.rule else f"{event.reason} ({event.rule})",
            event.status, latency, *sizes]


def _detail_summary(event: EventRow) -> str:
    detail = event.detail or {}
    command, duration = detail.get("command"), detail.get("duration")
    if event.kind == "run_start" and isinstance(command, list):
        return " ".join(str(part) for part in command)
    if event.kind == "run_end" and isinstance(duration, int | float):
        return f"exit {detail.get('exit_code')} after {format_duration(duration)}"
    return ", ".join(f"{key}={value}" for key, value in sorted(detail.items()))


# --------------------------------------------------------------------------------------------------
# audit events


@app.command("events")
def events(
    workspace: WorkspaceFilter = None,
    credential: Annotated[str | None, typer.Option("--credential", "-c", help="Only this credential.",
                                                   show_default=False)] = None,
    decision: Annotated[Decision | None, typer.Option("--decision", help="Only allowed or only denied requests.",
                                                      show_default=False)] = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N events.")] = 50,
    central: CentralFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Requests across runs, newest first, filtered by workspace, credential, decision and time."""
    since_ts = parse_point("--since", since) if since else None
    until_ts = parse_point("--until", until) if until else None
    if central:
        from outloop_cli.commands import audit_central

        audit_central.events(workspace=workspace, credential=credential,
                             decision=decision.value if decision else None, since=since_ts, until=until_ts,
                             limit=limit, as_json=as_json)
        return
    with _database() as conn:
        found = query_events(conn, workspace=workspace, credential=credential,
                             decision=decision.value if decision else None, since=since_ts, until=until_ts,
                             limit=limit)
    if as_json:
        print_json([event_record(e) for e in found])
        return
    if not found:
        note("no matching requests")
        return
    print_table(EVENT_HEADER, [_event_cells(e, with_run=True) for e in found],
                right=("status", "ms", "in", "out"), whole=("time", "run"))
    if len(found) == limit:
        note(f"showing the newest {limit}; narrow with --since/--until or raise --limit")


# --------------------------------------------------------------------------------------------------
# audit tail


@app.command("tail")
def tail(
    run_id: Annotated[str | None, typer.Argument(help="The run to follow (default: the newest live run, or "
                                                      "the next one to start).", show_default=False)] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Show the last N events already "
                                                                      "recorded first.")] = 10,
    workspace: WorkspaceFilter = None,
    as_json: JsonFlag = False,
) -> None:
    """Follow a run's events as they are recorded; ends when the run ends (or is found killed)."""
    with _database() as conn:
        if run_id is not None:
            run = find_run(conn, run_id).run
        else:
            run = live_or_next_run(conn, workspace=workspace,
                                   on_wait=lambda: note("waiting for a run to start (Ctrl-C to stop)"))
        note(f"following run {run.run_id} ({run.workspace}: {' '.join(run.command)})")
        last: EventRow | None = None
        for event in follow(conn, run, after_seq=count_events(conn, run.run_id) - lines - 1):
            sys.stdout.write(_json_line(event) if as_json else _tail_line(event))
            sys.stdout.flush()
            last = event
    if last is not None and last.kind == "run_end":
        note(f"run {run.run_id} ended: {_detail_summary(last)}")
        return
    raise OutloopError(f"run {run.run_id} stopped without an end record: its outloop process is gone "
                       "(killed?); `outloop audit verify` checks what it left", exit_code=EXIT_PROBLEMS_FOUND)


def _json_line(event: EventRow) -> str:
    return json.dumps(event_record(event), separators=(",", ":")) + "\n"


def _tail_line(event: EventRow) -> str:
    cells = _event_cells(event, with_run=False)
    return "  ".join(str(cell) for cell in cells if cell is not None) + "\n"


# --------------------------------------------------------------------------------------------------
# audit verify


@app.command("verify")
def verify(
    run_id: Annotated[str | None, typer.Argument(help="Check only this run (or `last`); default: every run.",
                                                 show_default=False)] = None,
    central: Annotated[bool, typer.Option("--central", help="Recompute every chain shipped to the central audit "
                                                           "database, from every host.")] = False,
    against_central: Annotated[bool, typer.Option("--against-central", help="Compare this host's chains with "
                                                  "what it shipped: catches a local rewrite after shipping.")]
    = False,
    as_json: JsonFlag = False,
) -> None:
    """Recompute hash chains and counts; exit 1 naming the run and first broken event on any break.

    A run with no end record whose chain holds is reported as incomplete (killed or still live), not broken.
    """
    if central or against_central:
        from outloop_cli.commands import audit_central

        if run_id is not None or (central and against_central):
            raise UsageError("--central and --against-central check every run: give one of them, and no RUN_ID")
        audit_central.verify(against=against_central, as_json=as_json)
        return
    with _database() as conn:
        verdicts = [verify_run(conn, find_run(conn, run_id).run.run_id)] if run_id else verify_all(conn)
    if not _report_verdicts([(None, verdict) for verdict in verdicts], as_json):
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


def _report_verdicts(verdicts: list[tuple[str | None, RunVerdict]], as_json: bool) -> bool:
    """Print the verdicts (each with its host, for central checks); False when any is broken."""
    counts = {status: sum(1 for _, v in verdicts if v.status == status)
              for status in ("ok", "incomplete", "pruned", "broken")}
    if as_json:
        print_json({"runs": len(verdicts), **counts, "verdicts": [_verdict_record(v, host) for host, v in verdicts]})
    else:
        for host, verdict in verdicts:
            if verdict.status != "ok":
                sys.stdout.write(("" if host is None else f"host {host}: ") + _verdict_line(verdict) + "\n")
        sys.stdout.write(f"{len(verdicts)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n")
    return not counts["broken"]


def _verdict_record(verdict: RunVerdict, host: str | None = None) -> dict[str, object]:
    record: dict[str, object] = {} if host is None else {"host_id": host}
    return {**record, "run_id": verdict.run_id, "status": verdict.status, "events": verdict.events,
            "first_bad_seq": verdict.first_bad_seq, "problem": verdict.problem}


def _verdict_line(verdict: RunVerdict) -> str:
    if verdict.status == "broken":
        return f"BROKEN      run {verdict.run_id} at event {verdict.first_bad_seq}: {verdict.problem}"
    if verdict.status == "incomplete":
        return (f"incomplete  run {verdict.run_id}: {verdict.events} events, chain intact, no end record "
                "(still live, or killed)")
    return f"pruned      run {verdict.run_id}: {verdict.events} events removed by `audit prune` (marker kept)"


# --------------------------------------------------------------------------------------------------
# audit export / prune


@app.command("export")
def export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="jsonl keeps every field exactly (hashes can be "
                                                               "re-checked); csv is for spreadsheets.")]
    = ExportFormat.jsonl,
    since: SinceOption = None,
    until: UntilOption = None,
    workspace: WorkspaceFilter = None,
) -> None:
    """Write every event (all kinds, oldest first) to stdout; redirect it to a file."""
    since_ts = parse_point("--since", since) if since else None
    until_ts = parse_point("--until", until) if until else None
    with _database() as conn:
        count = write_events(iter_events(conn, workspace=workspace, since=since_ts, until=until_ts), sys.stdout,
                             fmt.value)
    if sys.stderr.isatty():
        note(f"exported {count} events")


@app.command("prune")
def prune_command(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete runs that ended more than this long "
                                                                 "ago, e.g. 90d.", show_default=False)],
    as_json: JsonFlag = False,
) -> None:
    """Delete old finished runs and their events, keeping a marker per run (count and head hash) for verify."""
    before = parse_age("--older-than", older_than)
    removed = prune(audit_db_path(outloop_home()), older_than=before)
    if as_json:
        print_json({"pruned_runs": removed, "ended_before": format_time(before)})
        return
    sys.stdout.write(f"pruned {removed} runs that ended before {format_time(before)}; each left a marker "
                     "that `outloop audit verify` reports as pruned\n")
