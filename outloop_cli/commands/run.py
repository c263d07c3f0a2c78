"""`outloop run`: parse flags into a RunRequest, run it, print the summary, exit with the child's code."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from outloop_cli.commands.output import console, wants_plain
from outloop_cli.errors import OutloopError
from outloop_cli.units import format_bytes, format_duration, parse_duration

if TYPE_CHECKING:
    from outloop_cli.runner import RunReport

NETWORK_CHOICES = ("auto", "broker-only", "open")


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": False},
        help="Run COMMAND with a stripped environment and a policy-checking broker; exit with its code.\n\n"
             "Exit codes: the child's own; 128+N if killed by signal N; 124 timeout; 125 outloop failed "
             "(bad profile, missing secret, sandbox unavailable); 126 not executable; 127 not found.",
    )(run)


def run(
    command: Annotated[list[str], typer.Argument(help="The loop to run, after `--`.", show_default=False,
                                                 metavar="-- COMMAND [ARGS]...")],
    workspace: Annotated[str | None, typer.Option("-w", "--workspace", help="Workspace profile to use.")] = None,
    profiles: Annotated[Path | None, typer.Option("--profiles", help="Directory of profiles.")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", metavar="DUR",
                                                help="Kill the run after DUR (e.g. 30m).")] = None,
    network: Annotated[str | None, typer.Option("--network", metavar="auto|broker-only|open",
                                                help="Network isolation for this run.")] = None,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="Also write the summary as JSON.")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr.")] = False,
) -> None:
    from outloop_cli.runner import RunRequest, execute  # the broker stack loads only for `run`

    try:
        timeout_seconds = parse_duration(timeout) if timeout is not None else None
    except ValueError as exc:
        raise OutloopError(f"--timeout: {exc}") from None
    if network is not None and network not in NETWORK_CHOICES:
        raise OutloopError(f"--network: expected one of {', '.join(NETWORK_CHOICES)}, got {network!r}")
    report = execute(RunRequest(command=command, workspace=workspace, profiles_dir=profiles,
                                timeout=timeout_seconds, network=network, environ=dict(os.environ)))
    if summary_json is not None:
        _write_json(summary_json, report.to_json())
    if not quiet:
        render_summary(report)
    raise typer.Exit(report.exit_code)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutloopError(f"--summary-json: cannot write {path}: {exc.strerror}") from None


def render_summary(report: RunReport) -> None:
    if wants_plain(sys.stderr):
        sys.stderr.write(_plain_summary(report))
        return
    try:
        _rich_summary(report)
    except Exception:  # a rendering problem must never cost cron the child's exit code
        sys.stderr.write(_plain_summary(report))


def _outcome(report: RunReport) -> str:
    if report.timed_out:
        return f"{report.exit_code} (timed out)"
    if report.limit_hit:
        return f"{report.exit_code} (limit hit: {report.limit_hit})"
    if report.signal:
        return f"{report.exit_code} (killed by signal {report.signal})"
    return str(report.exit_code)


def _plain_summary(report: RunReport) -> str:
    lines = [
        f"outloop run {report.run_id}",
        f"  workspace  {report.workspace}",
        f"  command    {' '.join(report.command)}",
        f"  exit       {_outcome(report)}",
        f"  started    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(report.started_at))}",
        f"  duration   {format_duration(report.duration)}",
    ]
    for name, cred in report.credentials.items():
        lines.append(f"  {name:<10} allowed {cred.allowed}  denied {cred.denied}  "
                     f"rate-limited {cred.rate_limited}  in {format_bytes(cred.bytes_in)}  "
                     f"out {format_bytes(cred.bytes_out)}")
    for reason, count in sorted(report.denials.items(), key=lambda item: -item[1]):
        lines.append(f"  denied     {count} x {reason}")
    lines.append("  sandbox    " + ", ".join(f"{k}: {v}" for k, v in report.sandbox.items()))
    lines += [f"  WARNING    {k}: {v}" for k, v in report.sandbox.items() if "NOT" in v]
    lines += [f"  WARNING    {warning}" for warning in report.warnings]
    lines.append(f"  child      peak {format_bytes(report.peak_rss_bytes)}, cpu {report.cpu_seconds:.2f}s, "
                 f"strays killed {report.strays_killed}")
    lines.append(f"  audit      {report.audit_events} events, head {report.audit_head[:16]}  ({report.audit_db})")
    return "\n".join(lines) + "\n"


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
    header.add_row("duration", format_duration(report.duration))
    header.add_row("child", f"peak {format_bytes(report.peak_rss_bytes)}, cpu {report.cpu_seconds:.2f}s, "
                   f"strays killed {report.strays_killed}")
    sandbox_text = "\n".join(
        f"[bold red]{escape(k)}: {escape(v)}[/]" if "NOT" in v else escape(f"{k}: {v}")
        for k, v in report.sandbox.items())
    header.add_row("sandbox", sandbox_text)
    header.add_row("audit", f"{report.audit_events} events, head {report.audit_head[:16]}")
    table = Table(title=None, expand=False)
    for column in ("credential", "allowed", "denied", "rate-limited", "in", "out"):
        table.add_column(column, justify="left" if column == "credential" else "right")
    for name, cred in report.credentials.items():
        table.add_row(Text(name), str(cred.allowed), str(cred.denied), str(cred.rate_limited),
                      format_bytes(cred.bytes_in), format_bytes(cred.bytes_out))
    out.print(Panel(header, title=f"outloop run {report.run_id}", expand=False))
    out.print(table)
    for reason, count in sorted(report.denials.items(), key=lambda item: -item[1]):
        out.print(f"  [red]denied[/] {count} x {escape(reason)}")
    for warning in report.warnings:
        out.print(f"  [bold red]WARNING[/] {escape(warning)}")
