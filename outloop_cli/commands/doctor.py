"""`outloop doctor`: why outloop does or does not work on this machine, each problem with its fix.

Exit 0 when runs can work here (warnings allowed), 1 when something listed as PROBLEM stops them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from outloop_cli.commands.options import JsonFlag, ProfilesOption
from outloop_cli.commands.output import console, print_json
from outloop_cli.errors import EXIT_PROBLEMS_FOUND
from outloop_cli.units import plural

if TYPE_CHECKING:
    from outloop_cli.doctor import Finding

_MARKS = {"ok": ("ok", "green"), "warn": ("WARN", "yellow"), "problem": ("PROBLEM", "bold red"),
          "info": ("info", "dim")}


def register(root: typer.Typer) -> None:
    root.command("doctor")(doctor)


def doctor(
    workspace: Annotated[list[str] | None, typer.Option(
        "-w", "--workspace", metavar="WORKSPACE",
        help="Also do a no-op run of WORKSPACE (repeatable): its secrets from their real sources and its "
             "sandbox, with `true` as the child and no upstream call; exit 1 naming what it lacks. Run it from "
             "cron before the nightly window.", show_default=False)] = None,
    profiles: ProfilesOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Check the keyring backend (headless too), sandbox layers, paths, the audit database and versions."""
    from outloop_cli.doctor import diagnose, preflight  # probes and metadata load only for `doctor`

    report = diagnose(os.environ)
    for name in workspace or []:  # `workspace`, not `workspaces`: the completion generator knows that name
        report.findings.extend(preflight(name, profiles, os.environ))
    if as_json:
        print_json({"usable": not report.problems, "problems": len(report.problems),
                    "findings": [vars(f) for f in report.findings], "versions": report.versions})
    else:
        _print(report.findings, report.versions)
    if report.problems:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


def _print(findings: list[Finding], versions: dict[str, str]) -> None:
    from rich.text import Text

    out = console()
    section = None
    for finding in findings:
        if finding.section != section:
            section = finding.section
            out.print(Text(section, style="bold"))
        mark, style = _MARKS[finding.status]
        out.print(Text.assemble("  ", (f"{mark:<8}", style), f"{finding.name}: {finding.detail}"))
        if finding.fix and finding.status in ("warn", "problem"):
            out.print(Text(f"  {'':<8}fix: {finding.fix}"))
    out.print(Text("versions", style="bold"))
    out.print(Text("  " + ", ".join(f"{name} {version}" for name, version in versions.items())))
    problems = sum(1 for f in findings if f.status == "problem")
    verdict = f"outloop cannot run here: {plural(problems, 'problem')}" if problems else "outloop can run here"
    out.print(Text(verdict, style="bold red" if problems else "green"))
