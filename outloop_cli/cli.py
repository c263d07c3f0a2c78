"""The Typer app: wires the command groups and turns OutloopError into a message and an exit code.

This is the only place errors become output; commands and core raise, they never print failures themselves.
"""

from __future__ import annotations

import sys

import typer

from outloop_cli import __version__
from outloop_cli.commands import audit as audit_command
from outloop_cli.commands import complete as complete_command
from outloop_cli.commands import doctor as doctor_command
from outloop_cli.commands import run as run_command
from outloop_cli.commands import secret as secret_command
from outloop_cli.commands import workspace as workspace_command
from outloop_cli.errors import EXIT_OUTLOOP_FAILED, OutloopError

app = typer.Typer(
    name="outloop",
    help="Run unattended agent loops that never hold a key: a per-run broker checks each API call against "
         "the workspace profile, injects the secret, and audits it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
for _group in (run_command, audit_command, workspace_command, secret_command, doctor_command, complete_command):
    _group.register(app)


def _version(value: bool) -> None:
    if value:
        print(f"outloop {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """outloop: secrets stay with the broker, never with the loop."""


def main() -> None:
    try:
        # Non-standalone click returns the code of typer.Exit instead of raising it.
        code = app(standalone_mode=False)
    except OutloopError as exc:
        print(f"outloop: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("outloop: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"outloop: {exc.format_message()}", file=sys.stderr)
        sys.exit(_usage_exit_code(exc.exit_code))
    sys.exit(code if isinstance(code, int) else 0)


def _usage_exit_code(click_code: int) -> int:
    """`outloop run` keeps 1-123 for the child, so its own usage errors are 125 like coreutils `timeout`."""
    return EXIT_OUTLOOP_FAILED if len(sys.argv) > 1 and sys.argv[1] == "run" else click_code
