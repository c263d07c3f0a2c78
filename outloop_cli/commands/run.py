"""`outloop run`'s Typer command: its options and help, and --each; a single run goes to `run_once`.

The plain command lines never reach this module: `cli.run_cli` reads them with `run_once.parse_run_line`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from outloop_cli.commands.options import duration
from outloop_cli.errors import OutloopError
from outloop_cli.modes import NetworkMode


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
    from outloop_cli.commands.run_once import RunLine, run_once, summary_target, write_json  # only for `run`

    if each is None:
        if parallel != 1 or fail_fast:
            raise OutloopError("--parallel and --fail-fast go with --each")
        raise typer.Exit(run_once(RunLine(command=command, workspace=workspace, profiles=profiles, timeout=timeout,
                                          network=network, summary_json=summary_json, quiet=quiet,
                                          batch_id=batch_id)))
    if workspace is not None:
        raise OutloopError("-w and --each exclude each other: name one workspace, or several with --each")
    from outloop_cli.batch import BatchRequest, run_batch
    from outloop_cli.commands.batch_summary import render_batch_summary
    from outloop_cli.runner import new_run_id

    # Its directory is pinned before the runs start, so no loop can redirect the write (see PinnedFile).
    summary_file = summary_target(summary_json) if summary_json is not None else None
    try:
        batch = run_batch(BatchRequest(selection=each, command=command, batch_id=new_run_id(),
                                       profiles_dir=profiles, timeout=timeout, network=network,
                                       parallel=parallel, fail_fast=fail_fast, environ=dict(os.environ)))
        if summary_file is not None:
            write_json(summary_file, batch.to_json())
    finally:
        if summary_file is not None:
            summary_file.close()
    if not quiet:
        render_batch_summary(batch)
    raise typer.Exit(batch.exit_code)
