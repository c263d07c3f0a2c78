"""The combined summary of `outloop run --each`: one line per workspace, on stderr like a single run's."""

from __future__ import annotations

from outloop_cli.batch import BatchReport, BatchRun
from outloop_cli.commands.output import console, render_to_stderr
from outloop_cli.units import format_duration

COLUMNS = ("workspace", "run", "state", "exit", "duration", "allowed", "denied", "errors", "flagged", "chain")


def render_batch_summary(report: BatchReport) -> None:
    render_to_stderr(lambda: plain_batch_summary(report), lambda: _rich(report))


def _cells(run: BatchRun) -> list[str]:
    return [run.workspace, run.run_id or "-", run.state, "-" if run.exit_code is None else str(run.exit_code),
            format_duration(run.duration) if run.duration is not None else "-", str(run.allowed), str(run.denied),
            str(run.errors), str(run.flagged), run.chain or "-"]


def _footer(report: BatchReport) -> list[str]:
    failed = sum(1 for run in report.runs if run.state != "ok")
    lines = [f"{len(report.runs)} runs, {failed} not ok, in {format_duration(report.duration)}; "
             f"batch exit {report.exit_code}"]
    lines += [f"{run.workspace}: {run.error}" for run in report.runs if run.error]
    return lines


def plain_batch_summary(report: BatchReport) -> str:
    rows = [list(COLUMNS), *(_cells(run) for run in report.runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"outloop batch {report.batch_id}"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines += ["  " + line for line in _footer(report)]
    return "\n".join(lines) + "\n"


def _rich(report: BatchReport) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"outloop batch {report.batch_id}", expand=False)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("workspace", "run", "state", "chain") else "right")
    for run in report.runs:
        style = "green" if run.state == "ok" else "red"
        cells = _cells(run)
        table.add_row(*(Text(cell, style=style) if index == 2 else Text(cell) for index, cell in enumerate(cells)))
    out = console(stderr=True)
    out.print(table)
    for line in _footer(report):
        out.print(Text(line))
