"""The Typer app: wires the command groups and turns OutloopError into a message and an exit code.

This is the only place errors become output; commands and core raise, they never print failures themselves.
"""

from __future__ import annotations

import sys

import typer

from outloop_cli import __version__
from outloop_cli.commands import run as run_command
from outloop_cli.errors import OutloopError

app = typer.Typer(
    name="outloop",
    help="Run unattended agent loops that never hold a key: a per-run broker checks each API call against "
         "the workspace profile, injects the secret, and audits it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
run_command.register(app)


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
        app(standalone_mode=False)
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
    except Exception as exc:  # click's usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
