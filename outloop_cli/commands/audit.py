"""`outloop audit`: what ran, what it called, what was denied, and whether anyone edited the log.

Every subcommand opens audit.db read-only (except `prune`) and prints; the queries live in outloop_cli.audit.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated

import typer

from outloop_cli.audit.export import FORMATS, write_events
from outloop_cli.audit.queries import (
    RunView,
    count_events,
    event_record,
    exchange_record,
    failure_reasons,
    find_run,
    follow,
    live_or_next_run,
    operator_database,
    recent_runs,
    resolve_run_id,
    run_record,
    short_ids,
)
from outloop_cli.audit.store import (
    EventRow,
    Exchange,
    StatusRange,
    iter_events,
    prune,
    query_exchanges,
    run_exchanges,
)
from outloop_cli.audit.verify import RunVerdict, verify_all, verify_run
from outloop_cli.commands.options import JsonFlag, WorkspaceFilter
from outloop_cli.commands.output import print_json
from outloop_cli.commands.tables import note, print_pairs, print_table
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, OutloopError, UsageError
from outloop_cli.home import audit_db_path, outloop_home
from outloop_cli.timespec import clock_time, compact_time, format_time, parse_age, parse_point, zone_name
from outloop_cli.units import format_bytes, format_duration, plural

app = typer.Typer(
    help="Read the audit log. Without a subcommand: recent runs, newest first (NO END marks a run that never "
         "recorded its end, e.g. after kill -9). Subcommands: one run, events across runs, a live run, tamper "
         "checks, export and pruning.",
    rich_markup_mode=None,
)
RunIdArgument = Annotated[str, typer.Argument(help="A run id from `outloop audit` (any unique prefix of at least 4 "
                                                   "characters), or `last`.", show_default=False)]
SinceOption = Annotated[str | None, typer.Option("--since", help="From this time: \"24h\", \"7d\" (ago) or "
                                                 "\"2025-01-31[T18:00]\".", show_default=False)]
UntilOption = Annotated[str | None, typer.Option("--until", help="Before this time, same forms as --since.",
                                                 show_default=False)]
COMMAND_WIDTH = 40
STATUS_FORMS = "comma-separated codes or classes, e.g. 401, 5xx, 401,403,5xx"
FailedRunsFlag = Annotated[bool, typer.Option("--failed", help="Only runs that failed: a non-zero exit, requests "
                                              "that ended in an error, or no end record.")]
FailedRequestsFlag = Annotated[bool, typer.Option("--failed", help="Only allowed requests that ended in an error: "
                                                  "upstream 4xx/5xx, broker 502 (unreachable) or 504 (timeout).")]
RunStatusOption = Annotated[str | None, typer.Option(
    "--status", metavar="CODES", show_default=False,
    help=f"Only runs with a request answered with one of these HTTP statuses: {STATUS_FORMS}.")]
RequestStatusOption = Annotated[str | None, typer.Option(
    "--status", metavar="CODES", show_default=False,
    help=f"Only requests answered with one of these HTTP statuses (by the upstream, or by the broker for denials "
         f"and its own errors): {STATUS_FORMS}.")]


def parse_statuses(text: str | None) -> list[StatusRange]:
    """`--status 401,5xx` as inclusive ranges; a bad item is a usage error naming it."""
    if text is None:
        return []
    ranges = []
    for item in (part.strip().lower() for part in text.split(",")):
        if len(item) == 3 and item[0] in "12345" and item[1:] == "xx":
            ranges.append((int(item[0]) * 100, int(item[0]) * 100 + 99))
        elif item.isdigit() and 100 <= int(item) <= 599:
            ranges.append((int(item), int(item)))
        else:
            raise UsageError(f"--status: {item!r} is not an HTTP status; write {STATUS_FORMS}")
    return ranges


class Decision(StrEnum):
    allow = "allow"
    deny = "deny"


class ExportFormat(StrEnum):
    jsonl = FORMATS[0]
    csv = FORMATS[1]


CentralFlag = Annotated[bool, typer.Option("--central", help="Query the central audit database ([audit.central] "
                                           "in config.toml) across every host that ships to it.")]


def register(root: typer.Typer) -> None:
    from outloop_cli.commands import audit_central

    audit_central.register(app)
    root.add_typer(app, name="audit")


# --------------------------------------------------------------------------------------------------
# audit (recent runs)


@app.callback(invoke_without_command=True)
def recent(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N runs.")] = 20,
    workspace: WorkspaceFilter = None,
    failed: FailedRunsFlag = False,
    status: RunStatusOption = None,
    central: CentralFlag = False,
    batch: Annotated[str | None, typer.Option("--batch", metavar="ID", help="Only the runs of this `run --each` "
                                              "batch (its id is in the batch summary).", show_default=False)]
    = None,
    as_json: JsonFlag = False,
) -> None:
    """Recent runs, newest first; NO END marks a run that never recorded its end (killed, e.g. kill -9)."""
    if ctx.invoked_subcommand is not None:
        return
    statuses = parse_statuses(status)
    if central:
        from outloop_cli.commands import audit_central

        audit_central.recent(limit, workspace, failed, statuses, batch, as_json)
        return
    with operator_database() as conn:
        runs = recent_runs(conn, limit=limit, workspace=workspace, failed=failed, statuses=statuses, batch_id=batch)
        shown = short_ids(conn, [item.run.run_id for item in runs])
    if as_json:
        print_json([run_record(item) for item in runs])
        return
    if not runs:
        filtered = " matching" if failed or statuses or batch else ""
        note(f"no{filtered} runs recorded yet" + (f" for workspace {workspace!r}" if workspace else "")
             + (f" in batch {batch!r}" if batch else "")
             + ("" if filtered else "; `outloop run -w WORKSPACE -- COMMAND` records one"))
        return
    print_runs(runs, shown)


def print_runs(runs: list[RunView], shown: dict[str, str], hosts: list[str] | None = None) -> None:
    """The runs table; ``hosts`` adds a first column (the central listing, one host per run)."""
    columns = [f"started {zone_name()}", "run", "workspace", "exit", "took", "allow", "err", "deny", "state"]
    with_sandbox = any(item.sandbox != "ok" for item in runs)  # shown only when some run was less contained
    columns += ["sandbox", "command"] if with_sandbox else ["command"]
    rows = [_run_cells(item, shown[item.run.run_id], with_sandbox) for item in runs]
    if hosts is not None:
        columns, rows = ["host", *columns], [[host, *row] for host, row in zip(hosts, rows, strict=True)]
    print_table(columns, rows, right=("exit", "took", "allow", "err", "deny"), whole=(columns[0], "run", "state"))


def _run_cells(item: RunView, run_id: str, with_sandbox: bool) -> list[object]:
    run = item.run
    command = " ".join(run.command)
    if len(command) > COMMAND_WIDTH:
        command = command[: COMMAND_WIDTH - 3] + "..."
    duration = format_duration(run.duration) if run.duration is not None else None
    state = item.state.upper() if item.state == "no end" else item.state
    cells: list[object] = [compact_time(run.started_at), run_id, run.workspace, run.exit_code, duration,
                           run.allowed, run.errors, run.denied, state]
    return [*cells, item.sandbox, command] if with_sandbox else [*cells, command]


# --------------------------------------------------------------------------------------------------
# audit show


@app.command("show")
def show(
    run_id: RunIdArgument,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most the first N events.")] = 200,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w", help="With `last`: the newest run of this "
                                                  "workspace.", show_default=False)] = None,
    central: CentralFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """One run: why it failed (if it did), its header, then its events in order, each request with its outcome."""
    if central:
        from outloop_cli.commands import audit_central

        if workspace is not None:
            raise UsageError("--workspace reads the local audit only; with --central give the run id")
        audit_central.show(run_id, limit, as_json)
        return
    with operator_database() as conn:
        item = find_run(conn, run_id, workspace=workspace)
        exchanges = run_exchanges(conn, item.run.run_id, limit=limit)
        total = count_events(conn, item.run.run_id)
        reasons = failure_reasons(conn, item)
    if as_json:
        print_json({**run_record(item), "failure": reasons, "events_total": total,
                    "events": [exchange_record(e) for e in exchanges]})
        return
    print_run(item, exchanges, total, reasons)


def print_run(item: RunView, exchanges: list[Exchange], total: int, reasons: list[str],
              host: str | None = None) -> None:
    """`audit show`'s text: failure reasons, the header (with the host, for the central copy), the events."""
    run = item.run
    pairs: list[tuple[str, object]] = [("FAILED", reason) for reason in reasons]
    pairs += [("host", host)] if host is not None else []
    pairs += [
        ("run", run.run_id), ("workspace", run.workspace), ("command", " ".join(run.command)),
        ("started", format_time(run.started_at)), ("ended", format_time(run.ended_at)),
        ("state", item.state), ("exit", run.exit_code),
        ("duration", format_duration(run.duration) if run.duration is not None else None),
        ("requests", f"{run.allowed} allowed ({plural(run.errors, 'error')}), {run.denied} denied"),
        ("sandbox", ", ".join(f"{k}: {v}" for k, v in run.sandbox.items()) if isinstance(run.sandbox, dict)
         else run.sandbox),
        ("events", f"{total}, head {(run.head_hash or '')[:16]}"),
        ("policy", run.policy_hash), ("batch", run.batch_id),
    ]
    print_pairs(pairs)
    sys.stdout.write("\n")
    print_table(("seq", "time", "kind", "request", "result", "status", "ms", "sent", "recv", "credential",
                 "reason"), [_exchange_cells(e, None) for e in exchanges],
                right=("seq", "status", "ms", "sent", "recv"), whole=("seq", "time", "kind", "result"))
    shown = len(exchanges) + sum(1 for e in exchanges if e.response is not None)
    if total > shown:
        note(f"{total - shown} more events not shown; use --limit {total} or --json")


def _exchange_cells(exchange: Exchange, run_id: str | None) -> list[object]:
    """A row of `audit show` (run_id None: seq and time of day) or `audit events` (date, time and short run id)."""
    event, response = exchange.event, exchange.response
    request = f"{event.method} {event.path}" if event.method else _detail_summary(event)
    first = [compact_time(event.ts, seconds=True), run_id] if run_id else [event.seq, clock_time(event.ts), event.kind]
    outcome = response if response is not None else event
    latency = f"{outcome.latency_ms:.0f}" if outcome.latency_ms is not None else None
    sizes = [format_bytes(value) if value is not None else None for value in (outcome.bytes_in, outcome.bytes_out)]
    why = event.reason if not event.rule else f"{event.reason} ({event.rule})"
    if response is not None and response.error:
        why = f"{response.error}; {why}"
    result = "limited" if exchange.result == "rate_limited" else exchange.result
    cells = [*first, request, result, exchange.status, latency, *sizes, event.credential, why]
    return [*cells, event.workspace] if run_id else cells


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
    failed: FailedRequestsFlag = False,
    status: RequestStatusOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N events.")] = 50,
    central: CentralFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Requests across runs, newest first, each with its outcome (status, latency, bytes); filtered by workspace,
    credential, decision, outcome and time."""
    since_ts = parse_point("--since", since) if since else None
    until_ts = parse_point("--until", until) if until else None
    statuses = parse_statuses(status)
    if central:
        from outloop_cli.commands import audit_central

        audit_central.events(workspace=workspace, credential=credential,
                             decision=decision.value if decision else None, since=since_ts, until=until_ts,
                             failed=failed, statuses=statuses, limit=limit, as_json=as_json)
        return
    with operator_database() as conn:
        found = query_exchanges(conn, workspace=workspace, credential=credential,
                                decision=decision.value if decision else None, since=since_ts, until=until_ts,
                                failed=failed, statuses=statuses, limit=limit)
        shown = short_ids(conn, sorted({e.event.run_id for e in found}))
    if as_json:
        print_json([exchange_record(e) for e in found])
        return
    if not found:
        note("no matching requests")
        return
    print_exchanges(found, shown, limit)


def print_exchanges(found: list[Exchange], shown: dict[str, str], limit: int, hosts: list[str] | None = None) -> None:
    """The `audit events` table; ``hosts`` adds a first column (the central listing)."""
    columns = [f"time {zone_name()}", "run", "request", "result", "status", "ms", "sent", "recv", "credential",
               "reason", "workspace"]
    rows = [_exchange_cells(e, shown[e.event.run_id]) for e in found]
    if hosts is not None:
        columns, rows = ["host", *columns], [[host, *row] for host, row in zip(hosts, rows, strict=True)]
    print_table(columns, rows, right=("status", "ms", "sent", "recv"), whole=(columns[0], "run", "result"))
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
    with operator_database(missing_ok=False) as conn:
        if run_id is not None:
            run = find_run(conn, run_id, workspace=workspace).run
        else:
            run = live_or_next_run(conn, workspace=workspace,
                                   on_wait=lambda: note("waiting for a run to start (Ctrl-C to stop)"))
        note(f"following run {run.run_id} ({run.workspace}: {' '.join(run.command)})")
        last: EventRow | None = None
        for event in follow(conn, run, after_seq=count_events(conn, run.run_id) - lines - 1):
            sys.stdout.write(_json_line(event) if as_json else tail_line(event))
            sys.stdout.flush()
            last = event
    if last is not None and last.kind == "run_end":
        note(f"run {run.run_id} ended: {_detail_summary(last)}")
        return
    raise OutloopError(f"run {run.run_id} stopped without an end record: its outloop process is gone "
                       "(killed?); `outloop audit verify` checks what it left", exit_code=EXIT_PROBLEMS_FOUND)


def _json_line(event: EventRow) -> str:
    return json.dumps(event_record(event), separators=(",", ":")) + "\n"


# Fixed widths, so lines written one at a time (to a pipe, as they happen) still line up: seq, time, kind,
# credential, decision, status, ms, bytes; the request comes last, where its length does no harm.
_TAIL_FORMAT = "{:>5}  {:<12}  {:<9}  {:<10}  {:<5}  {:>3}  {:>6}  {:>8}  {:>8}  {}\n"


def tail_line(event: EventRow) -> str:
    """One event as `audit tail` prints it; an outcome is its own line, under the request it answers."""
    what = f"{event.method} {event.path}" if event.method else _detail_summary(event)
    if event.kind == "request":
        what += f"  ({event.reason}{f', {event.rule}' if event.rule else ''})"
    elif event.error:
        what += f"  ({event.error})"
    sizes = [format_bytes(value) if value is not None else "" for value in (event.bytes_in, event.bytes_out)]
    return _TAIL_FORMAT.format(event.seq, clock_time(event.ts), event.kind, event.credential or "-",
                               event.decision or "", event.status or "",
                               f"{event.latency_ms:.0f}" if event.latency_ms is not None else "", *sizes, what)


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
    with operator_database() as conn:
        verdicts = [verify_run(conn, resolve_run_id(conn, run_id))] if run_id else verify_all(conn)
    if not report_verdicts([(None, verdict) for verdict in verdicts], as_json):
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


def report_verdicts(verdicts: list[tuple[str | None, RunVerdict]], as_json: bool) -> bool:
    """Print the verdicts (each with its host, for central checks); False when any is broken."""
    counts = {status: sum(1 for _, v in verdicts if v.status == status)
              for status in ("ok", "incomplete", "pruned", "broken")}
    if as_json:
        print_json({"runs": len(verdicts), **counts, "verdicts": [_verdict_record(v, host) for host, v in verdicts]})
    else:
        for host, verdict in verdicts:
            if verdict.status != "ok":
                sys.stdout.write(("" if host is None else f"host {host}: ") + _verdict_line(verdict) + "\n")
        sys.stdout.write(f"{plural(len(verdicts), 'run')}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                         + "\n")
    return not counts["broken"]


def _verdict_record(verdict: RunVerdict, host: str | None = None) -> dict[str, object]:
    record: dict[str, object] = {} if host is None else {"host_id": host}
    return {**record, "run_id": verdict.run_id, "status": verdict.status, "events": verdict.events,
            "first_bad_seq": verdict.first_bad_seq, "problem": verdict.problem}


def _verdict_line(verdict: RunVerdict) -> str:
    if verdict.status == "broken":
        return f"BROKEN      run {verdict.run_id} at event {verdict.first_bad_seq}: {verdict.problem}"
    if verdict.status == "incomplete":
        return (f"incomplete  run {verdict.run_id}: {plural(verdict.events, 'event')}, chain intact, no end record "
                "(still live, or killed)")
    return (f"pruned      run {verdict.run_id}: {plural(verdict.events, 'event')} removed by `audit prune` "
            "(marker kept)")


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
    run_id: Annotated[str | None, typer.Option("--run", metavar="RUN_ID", help="Only this run (an id, a unique "
                                               "prefix, or `last`).", show_default=False)] = None,
) -> None:
    """Write every event (all kinds, oldest first) to stdout; redirect it to a file."""
    since_ts = parse_point("--since", since) if since else None
    until_ts = parse_point("--until", until) if until else None
    with operator_database() as conn:
        only = resolve_run_id(conn, run_id, workspace=workspace) if run_id else None
        count = write_events(iter_events(conn, workspace=workspace, since=since_ts, until=until_ts, run_id=only),
                             sys.stdout, fmt.value)
    if sys.stderr.isatty():
        note(f"exported {plural(count, 'event')}")


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
    sys.stdout.write(f"pruned {plural(removed, 'run')} that ended before {format_time(before)}; each left a marker "
                     "that `outloop audit verify` reports as pruned\n")
