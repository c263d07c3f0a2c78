"""The Typer app: wires the command groups and turns OutloopError into a message and an exit code.

This is the only place errors become output; commands and core raise, they never print failures themselves.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import typer

from outloop_cli import __version__
from outloop_cli.errors import EXIT_OUTLOOP_FAILED, OutloopError

# Command name -> the module that registers it. Only the invoked group is imported (a cron job running
# `outloop run` every minute should not pay for the audit, secret and doctor modules); help loads them all.
COMMAND_MODULES = {
    "run": "outloop_cli.commands.run",
    "audit": "outloop_cli.commands.audit",
    "workspace": "outloop_cli.commands.workspace",
    "secret": "outloop_cli.commands.secret",
    "doctor": "outloop_cli.commands.doctor",
    "policy": "outloop_cli.commands.policy",
    "__complete": "outloop_cli.commands.complete",
}


def build_app(argv: Sequence[str] = ()) -> typer.Typer:
    """The app with the command group `argv` asks for, or with every group when it names none."""
    app = typer.Typer(
        name="outloop",
        help="Run unattended agent loops that never hold a key: a per-run broker checks each API call against "
             "the workspace profile, injects the secret, and audits it.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    app.callback()(main_options)
    requested = next((arg for arg in argv if not arg.startswith("-")), None)
    names = [requested] if requested in COMMAND_MODULES else list(COMMAND_MODULES)
    for name in names:
        importlib.import_module(COMMAND_MODULES[name]).register(app)
    return app


def _version(value: bool) -> None:
    if value:
        print(f"outloop {__version__}")
        raise typer.Exit()


def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """outloop: secrets stay with the broker, never with the loop."""


def run_cli(argv: Sequence[str]) -> int:
    """Run outloop with `argv` (without the program name) and return its exit code; errors are printed here."""
    try:
        # Non-standalone click returns the code of typer.Exit instead of raising it.
        code = build_app(argv)(args=list(argv), prog_name="outloop", standalone_mode=False)
    except OutloopError as exc:
        print(f"outloop: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("outloop: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"outloop: {exc.format_message()}", file=sys.stderr)
        return _usage_exit_code(argv, exc.exit_code)
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run_cli(sys.argv[1:]))


def _usage_exit_code(argv: Sequence[str], click_code: int) -> int:
    """`outloop run` keeps 1-123 for the child, so its own usage errors are 125 like coreutils `timeout`."""
    return EXIT_OUTLOOP_FAILED if argv and argv[0] == "run" else click_code
