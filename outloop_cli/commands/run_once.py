"""One plain `outloop run`: its command line read without the Typer app, the run, and its summary on stderr.

A cron job starting `outloop run -w W -- loop` every minute should not pay for Typer and click (~40 ms, a third of
a run's start-up) to read five flags. `cli.run_cli` gives `run`'s arguments to `parse_run_line` first; anything it
does not recognise with certainty (help, --each, an unknown or malformed flag, a bad value) is left to the Typer
command in `commands/run.py`, which reports it. Both then call `run_once`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outloop_cli.commands.output import console, render_to_stderr
from outloop_cli.errors import OutloopError
from outloop_cli.modes import NetworkMode
from outloop_cli.timespec import format_time
from outloop_cli.units import format_bytes, format_duration, parse_duration, plural

if TYPE_CHECKING:
    from outloop_cli.audit.tally import Counts
    from outloop_cli.private_fs import PinnedFile
    from outloop_cli.runner import RunReport

# The flags the plain path reads (each is an option of the Typer command of the same parameter name; a test holds
# them to it), and whether each takes a value.
FLAGS = {"-w": "workspace", "--workspace": "workspace", "--profiles": "profiles", "--timeout": "timeout",
         "--network": "network", "--summary-json": "summary_json", "-q": "quiet", "--quiet": "quiet",
         "--batch-id": "batch_id"}
_FLAGS_WITHOUT_VALUE = frozenset({"quiet"})


@dataclass(frozen=True)
class RunLine:
    """One run's command line, as both parsers deliver it."""

    command: list[str]
    workspace: str | None = None
    profiles: Path | None = None
    timeout: float | None = None
    network: NetworkMode | None = None
    summary_json: Path | None = None
    quiet: bool = False
    batch_id: str | None = None


def parse_run_line(args: Sequence[str]) -> RunLine | None:
    """`run`'s arguments as the Typer command would read them, or None where that needs the Typer command.

    Options end at `--` or at the first word that is not one (the command's own flags are never read), as in the
    Typer command. Left to it: any flag not in FLAGS, `--flag=value` of one that takes none, a flag given twice,
    a value that looks like a flag or does not parse, and a missing command.
    """
    values: dict[str, Any] = {}
    rest = list(args)
    while rest and rest[0] != "--" and rest[0].startswith("-") and rest[0] != "-":
        flag, has_inline, inline = rest.pop(0).partition("=")
        name = FLAGS.get(flag)
        if name is None or name in values or (has_inline and (name in _FLAGS_WITHOUT_VALUE or flag[1] != "-")):
            return None
        if name in _FLAGS_WITHOUT_VALUE:
            values[name] = True
            continue
        if not has_inline:
            if not rest or rest[0].startswith("-"):
                return None
            inline = rest.pop(0)
        value = _value(name, inline)
        if value is None:
            return None
        values[name] = value
    command = rest[1:] if rest[:1] == ["--"] else rest
    return RunLine(command=command, **values) if command else None


def _value(name: str, text: str) -> object | None:
    if not text:
        return None
    if name == "timeout":
        try:
            return parse_duration(text)
        except ValueError:
            return None
    if name == "network":
        try:
            return NetworkMode(text)
        except ValueError:
            return None
    return Path(text) if name in ("profiles", "summary_json") else text


def run_once(line: RunLine) -> int:
    """Run it, write --summary-json, print the summary unless quiet; the child's exit code (an OutloopError when the
    child never started)."""
    from outloop_cli.sandbox.probe import start_probe

    start_probe(os.environ)  # bubblewrap's probe runs on the other core while the run stack loads
    from outloop_cli.runner import RunRequest, execute  # the run stack loads only for a run

    # Its directory is pinned before the child starts, so the loop cannot redirect the write (see PinnedFile).
    summary_file = summary_target(line.summary_json) if line.summary_json is not None else None
    try:
        report = execute(RunRequest(command=line.command, workspace=line.workspace, profiles_dir=line.profiles,
                                    timeout=line.timeout, network=line.network, environ=dict(os.environ),
                                    batch_id=line.batch_id))
        if summary_file is not None:
            write_json(summary_file, report.to_json())
    finally:
        if summary_file is not None:
            summary_file.close()
    if not line.quiet:
        render_summary(report)
    return report.exit_code


def summary_target(path: Path) -> PinnedFile:
    from outloop_cli.private_fs import PinnedFile  # the run path loads it anyway; `run --help` need not

    try:
        return PinnedFile(path)
    except OSError as exc:
        raise OutloopError(f"--summary-json: cannot write {path}: {exc.strerror}") from None


def write_json(target: PinnedFile, data: object) -> None:
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
