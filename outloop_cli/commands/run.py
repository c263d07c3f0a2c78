"""`outloop run`: parse flags into a RunRequest, run it, print the summary, exit with the child's code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from outloop_cli.commands.options import duration
from outloop_cli.commands.output import console, render_to_stderr
from outloop_cli.errors import OutloopError
from outloop_cli.modes import NetworkMode
from outloop_cli.timespec import format_time
from outloop_cli.units import format_bytes, format_duration, plural

if TYPE_CHECKING:
    from outloop_cli.audit.tally import Counts
    from outloop_cli.private_fs import PinnedFile
    from outloop_cli.runner import RunReport


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": False},
        help="Run COMMAND with a stripped environment and a policy-checking broker; exit with its code.\n\n"
             "Exit codes: the child's own; 128+N if killed by signal N; 124 timeout; 125 outloop failed "
             "(bad profile, missing secret, sandbox unavailable); 126 not executable; 127 not found.\n\n"
             "With --each, one separate run per workspace; the batch exits 0 when every run succeeded, else "
             "with the number of workspaces that did not (at most 100), or 125 when the selection is bad.",
    )(run)


def run(
    command: Annotated[list[str], typer.Argument(help="The loop to run, after `--`.", show_default=False,
                                                 metavar="-- COMMAND [ARGS]...")],
    workspace: Annotated[str | None, typer.Option("-w", "--workspace", help="Workspace profile to use.")] = None,
    profiles: Annotated[Path | None, typer.Option("--profiles", help="Directory of profiles.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", metavar="DUR", parser=duration,
                                                  help="Kill the run after DUR (e.g. 30m).")] = None,
    network: Annotated[NetworkMode | None, typer.Option("--network", metavar="|".join(NetworkMode),
                                                        help="Network isolation for this run.")] = None,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="Also write the summary as JSON.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr.")] = False,
    each: Annotated[str | None, typer.Option("--each", metavar="W1,W2|@TAG|all",
                                             help="Run once per workspace, each run separate: names, a profile "
                                                  "tag, or every workspace.", show_default=False)] = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, metavar="N",
                                          help="With --each: run up to N workspaces side by side.")] = 1,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="With --each: stop the other runs (and start no "
                                                                "more) once one fails.")] = False,
    batch_id: Annotated[str | None, typer.Option("--batch-id", hidden=True)] = None,
) -> None:
    from outloop_cli.runner import RunRequest, execute, new_run_id  # the broker stack loads only for `run`

    # Its directory is pinned before the child starts, so the loop cannot redirect the write (see PinnedFile).
    summary_file = _summary_file(summary_json) if summary_json is not None else None
    try:
        if each is not None:
            if workspace is not None:
                raise OutloopError("-w and --each exclude each other: name one workspace, or several with --each")
            from outloop_cli.batch import BatchRequest, run_batch
            from outloop_cli.commands.batch_summary import render_batch_summary

            batch = run_batch(BatchRequest(selection=each, command=command, batch_id=new_run_id(),
                                           profiles_dir=profiles, timeout=timeout, network=network,
                                           parallel=parallel, fail_fast=fail_fast, environ=dict(os.environ)))
            if summary_file is not None:
                _write_json(summary_file, batch.to_json())
            if not quiet:
                render_batch_summary(batch)
            raise typer.Exit(batch.exit_code)
        if parallel != 1 or fail_fast:
            raise OutloopError("--parallel and --fail-fast go with --each")
        report = execute(RunRequest(command=command, workspace=workspace, profiles_dir=profiles,
                                    timeout=timeout, network=network, environ=dict(os.environ),
                                    batch_id=batch_id))
        if summary_file is not None:
            _write_json(summary_file, report.to_json())
    finally:
        if summary_file is not None:
            summary_file.close()
    if not quiet:
        render_summary(report)
    raise typer.Exit(report.exit_code)


def _summary_file(path: Path) -> PinnedFile:
    from outloop_cli.private_fs import PinnedFile  # the run path loads it anyway; `run --help` need not

    try:
        return PinnedFile(path)
    except OSError as exc:
        raise OutloopError(f"--summary-json: cannot write {path}: {exc.strerror}") from None


def _write_json(target: PinnedFile, data: object) -> None:
    try:
        target.write((json.dumps(data, indent=2) + "\n").encode())
    except OSError as exc:
        raise OutloopError(f"--summary-json: cannot write {target.path}: {exc.strerror}") from None


def render_summary(report: RunReport) -> None:
    render_to_stderr(lambda: _plain_summary(report), lambda: _rich_summary(report))


def _outcome(report: RunReport) -> str:
    if report.timed_out:
        return f"{report.exit_code} (timed out)"
    if report.limit_hit:
        return f"{report.exit_code} (limit hit: {report.limit_hit})"
    if report.signal:
        return f"{report.exit_code} (killed by signal {report.signal})"
    return str(report.exit_code)


def _counts_text(counts: Counts) -> str:
    """One credential's requests, each counted once: errors are among the allowed, rate-limited among the denied."""
    allowed = f"allowed {counts.allowed}" + (f" ({plural(counts.errors, 'error')})" if counts.errors else "")
    denied = f"denied {counts.denied}" + (f" ({counts.rate_limited} rate-limited)" if counts.rate_limited else "")
    return (f"{allowed}  {denied}  sent {format_bytes(counts.bytes_sent)}  "
            f"received {format_bytes(counts.bytes_received)}")


def _breakdown(report: RunReport) -> list[tuple[str, str]]:
    """Why requests were refused or failed: (label, text) lines; their counts add up to the denied and errors."""
    lines = []
    for denial in report.tally.denials:
        why = denial.reason + (f" (rule {denial.rule})" if denial.rule else "")
        lines.append(("denied", f"{denial.count} x {why}, {_whose(denial.credential)}"))
    for failure in report.tally.failures:
        what = failure.error or "upstream answered"
        lines.append(("error", f"{failure.count} x {what} {failure.status or ''}".rstrip()
                      + f", {_whose(failure.credential)}"))
    for flag in report.tally.flags:
        why = flag.reason + (f" (rule {flag.rule})" if flag.rule else "")
        lines.append(("flagged", f"{flag.count} x {why}, {_whose(flag.credential)}"))
    return lines


def _whose(credential: str | None) -> str:
    return f"credential {credential}" if credential else "no credential"


UNATTRIBUTED_NOTE = ("(no credential of the profile: /v1/run, unknown credentials, callers not in the run, bad routes, "
                     "egress tunnels and refused CONNECTs)")


def _plain_summary(report: RunReport) -> str:
    lines = [
        f"outloop run {report.run_id}",
        f"  workspace  {report.workspace}",
        f"  command    {' '.join(report.command)}",
        f"  exit       {_outcome(report)}",
        f"  started    {format_time(report.started_at)}",
        f"  duration   {format_duration(report.duration)}",
    ]
    for name, counts in report.tally.credentials.items():
        lines.append(f"  {name:<10} {_counts_text(counts)}")
    if report.tally.unattributed.requests:
        lines.append(f"  {'other':<10} {_counts_text(report.tally.unattributed)}  {UNATTRIBUTED_NOTE}")
    lines += [f"  {label:<10} {text}" for label, text in _breakdown(report)]
    if report.counts_error:
        lines.append(f"  WARNING    request counts unavailable: {report.counts_error}")
    lines.append("  sandbox    " + ", ".join(f"{k}: {v}" for k, v in report.sandbox.items()))
    lines += [f"  WARNING    {k}: {v}" for k, v in report.sandbox.items() if "NOT" in v]
    lines += [f"  WARNING    {warning}" for warning in report.warnings]
    lines.append(f"  child      peak {format_bytes(report.peak_rss_bytes)}, cpu {report.cpu_seconds:.2f}s, "
                 f"strays killed {report.strays_killed}")
    lines.append(f"  policy     {report.policy_hash[:23]}" + (f"  batch {report.batch_id}" if report.batch_id else ""))
    lines.append(f"  audit      {plural(report.audit_events, 'event')}, head {report.audit_head[:16]}  "
                 f"({report.audit_db})")
    if report.notify is not None:
        lines.append(f"  notify     {notify_line(report.notify)}")
    if report.central:
        lines.append(f"  central    {report.central}")
    return "\n".join(lines) + "\n"


def notify_line(outcome: dict[str, Any]) -> str:
    """What the [notify] hook did, in one line; a failed hook is loud, since nobody else was told."""
    why = ", ".join(outcome["triggers"])
    if outcome["error"] is None:
        return f"{outcome['command']} ran ({why})"
    return f"FAILED: {outcome['command']} ({why}): {outcome['error']}"


def _rich_summary(report: RunReport) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    out = console(stderr=True)
    header = Table.grid(padding=(0, 2))
    header.add_row("workspace", f"[bold]{escape(report.workspace)}[/]")
    header.add_row("command", Text(" ".join(report.command)))  # the child's argv is data, never markup
    style = "green" if report.exit_code == 0 else "red"
    header.add_row("exit", f"[{style}]{_outcome(report)}[/]")
    header.add_row("started", format_time(report.started_at))
    header.add_row("duration", format_duration(report.duration))
    header.add_row("child", f"peak {format_bytes(report.peak_rss_bytes)}, cpu {report.cpu_seconds:.2f}s, "
                   f"strays killed {report.strays_killed}")
    sandbox_text = "\n".join(
        f"[bold red]{escape(k)}: {escape(v)}[/]" if "NOT" in v else escape(f"{k}: {v}")
        for k, v in report.sandbox.items())
    header.add_row("sandbox", sandbox_text)
    batch = f"  batch {report.batch_id}" if report.batch_id else ""
    header.add_row("policy", escape(report.policy_hash[:23]) + batch)
    header.add_row("audit", f"{plural(report.audit_events, 'event')}, head {report.audit_head[:16]}")
    if report.notify is not None:
        failed = report.notify["error"] is not None
        header.add_row("notify", Text(notify_line(report.notify), style="bold red" if failed else ""))
    if report.central:
        header.add_row("central", Text(report.central))
    table = Table(title=None, expand=False, caption="errors: allowed, but the answer failed; "
                  "rate-limited: among the denied; bytes are bodies sent to and received from upstream")
    for column in ("credential", "allowed", "errors", "denied", "rate-limited", "sent", "received"):
        table.add_column(column, justify="left" if column == "credential" else "right")
    rows = list(report.tally.credentials.items())
    if report.tally.unattributed.requests:
        rows.append(("other", report.tally.unattributed))
    for name, counts in rows:
        table.add_row(Text(name), str(counts.allowed), Text(str(counts.errors), style="red" if counts.errors else ""),
                      str(counts.denied), str(counts.rate_limited), format_bytes(counts.bytes_sent),
                      format_bytes(counts.bytes_received))
    out.print(Panel(header, title=f"outloop run {report.run_id}", expand=False))
    out.print(table)
    if report.tally.unattributed.requests:
        out.print(f"  other: {UNATTRIBUTED_NOTE}")
    for label, text in _breakdown(report):
        out.print(f"  [red]{label}[/] {escape(text)}")
    if report.counts_error:
        out.print(f"  [bold red]request counts unavailable:[/] {escape(report.counts_error)}")
    for warning in report.warnings:
        out.print(f"  [bold red]WARNING[/] {escape(warning)}")
