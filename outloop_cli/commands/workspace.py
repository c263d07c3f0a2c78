"""`outloop workspace`: list, show, choose, create and check the workspace profiles.

Parsing and printing only; outloop_cli.workspaces does the work. Secrets appear as present / missing, never values.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from outloop_cli.commands.options import JsonFlag, ProfilesOption, WorkspaceArgument
from outloop_cli.commands.output import print_json
from outloop_cli.commands.tables import note, print_table
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, OutloopError
from outloop_cli.home import outloop_home, profile_dirs
from outloop_cli.profile_toml import render_profile
from outloop_cli.profiles import load_profile
from outloop_cli.secret_admin import SecretStatus, profile_secrets
from outloop_cli.units import plural
from outloop_cli.workspaces import (
    ENV_CHOICE,
    WorkspaceCheck,
    check_workspaces,
    current_choice,
    list_workspaces,
    new_profile,
    resolved_profile,
    use_workspace,
)

app = typer.Typer(help="List, show, choose, create and check workspace profiles.", no_args_is_help=True,
                  rich_markup_mode=None)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="workspace")


@app.command("list")
def list_command(
    profiles: ProfilesOption = None,
    show_all: Annotated[bool, typer.Option("--all", help="Also list bases (abstract = true), which never run.")]
    = False,
    as_json: JsonFlag = False,
) -> None:
    """Every runnable workspace along the profile path: description, credentials, file; * marks the current one."""
    choice = current_choice(outloop_home(), os.environ)
    entries = [e for e in list_workspaces(profile_dirs(profiles), choice.workspace if choice else None)
               if show_all or not e.abstract]
    if as_json:
        print_json([{"name": e.name, "current": e.current, "description": e.description, "extends": e.extends,
                     "abstract": e.abstract, "credentials": list(e.credentials), "path": str(e.path),
                     "error": e.error} for e in entries])
        return
    if not entries:
        searched = ", ".join(str(d) for d in profile_dirs(profiles))
        note(f"no profiles in {searched}; create one with `outloop workspace new NAME`")
        return
    print_table(("", "workspace", "description", "credentials", "file"), [
        ["*" if e.current else "", e.name + (" (base)" if e.abstract else ""),
         e.description if e.error is None else f"BROKEN: {e.error}",
         ", ".join(e.credentials), e.path] for e in entries])


@app.command("show")
def show(workspace: WorkspaceArgument, profiles: ProfilesOption = None, as_json: JsonFlag = False) -> None:
    """The profile after `extends`, as TOML (`# from BASE` marks inherited keys); secrets only as present/missing."""
    profile = load_profile(workspace, profile_dirs(profiles))
    statuses = profile_secrets(profile, os.environ, run_commands=False)
    if as_json:
        print_json(resolved_profile(profile, statuses))
        return
    sys.stdout.write(render_profile(profile, statuses))


@app.command("use")
def use(workspace: WorkspaceArgument, profiles: ProfilesOption = None) -> None:
    """Make WORKSPACE the default for `outloop run` (written to config.toml)."""
    path = use_workspace(outloop_home(), profile_dirs(profiles), workspace)
    sys.stdout.write(f"current workspace: {workspace} (saved in {path})\n")
    if os.environ.get(ENV_CHOICE) and os.environ[ENV_CHOICE] != workspace:
        note(f"note: {ENV_CHOICE}={os.environ[ENV_CHOICE]} is set in this environment and wins over config.toml")


@app.command("current")
def current(as_json: JsonFlag = False) -> None:
    """The workspace `outloop run` uses without -w, and where that choice comes from; exit 1 if none."""
    choice = current_choice(outloop_home(), os.environ)
    if as_json:
        print_json({"workspace": choice.workspace if choice else None, "source": choice.source if choice else None})
    elif choice is not None:
        sys.stdout.write(f"{choice.workspace}\n")
        note(f"(from {choice.source})")
    if choice is None:
        raise OutloopError(f"no workspace chosen: run `outloop workspace use NAME` or set {ENV_CHOICE}",
                           exit_code=EXIT_PROBLEMS_FOUND)


@app.command("new")
def new(
    # Not `workspace`: completion offers existing workspaces for that name, and a new one cannot be one of them.
    name: Annotated[str, typer.Argument(metavar="WORKSPACE", help="Name of the new workspace.", show_default=False)],
    extends: Annotated[str | None, typer.Option("--extends", help="Inherit the credentials of this workspace.",
                                                show_default=False)] = None,
    profiles: ProfilesOption = None,
) -> None:
    """Write a commented starter profile into the first profile directory; never overwrites."""
    path = new_profile(profile_dirs(profiles), name, extends=extends)
    sys.stdout.write(f"created {path}\n")
    note(f"edit it, then `outloop workspace check {name}`")


@app.command("check")
def check(
    workspace: Annotated[str | None, typer.Argument(help="Check only this workspace (default: all).",
                                                    show_default=False)] = None,
    profiles: ProfilesOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate profiles and resolve every secret (running cmd: sources) without printing any; exit 1 on problems."""
    results = check_workspaces(profile_dirs(profiles), [workspace] if workspace else None, outloop_home(),
                               os.environ)
    problems = sum(len(result.problems) for result in results)
    if as_json:
        print_json({"problems": problems, "workspaces": [_check_record(r) for r in results]})
    else:
        for result in results:
            _print_check(result)
        sys.stdout.write(f"{plural(len(results), 'workspace')} checked, {plural(problems, 'problem')}\n")
    if problems:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


def _status_record(status: SecretStatus) -> dict[str, object]:
    return {"credential": status.credential, "owner": status.owner, "source": status.source,
            "state": status.state, "problem": status.problem}


def _check_record(result: WorkspaceCheck) -> dict[str, object]:
    return {"workspace": result.name, "path": str(result.path) if result.path else None,
            "ok": not result.problems, "problems": result.problems, "warnings": result.warnings,
            "secrets": [_status_record(s) for s in result.secrets]}


def _print_check(result: WorkspaceCheck) -> None:
    if not result.problems:
        sys.stdout.write(f"ok       {result.name}: {plural(len(result.secrets), 'secret')} present\n")
    else:
        sys.stdout.write(f"PROBLEM  {result.name}\n")
    for problem in result.problems:
        sys.stdout.write(f"  - {problem}\n")
    for warning in result.warnings:
        sys.stdout.write(f"  warning: {warning}\n")
