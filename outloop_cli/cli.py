"""The Typer app: wires the command groups and turns OutloopError into a message and an exit code.

This is the only place errors become output; commands and core raise, they never print failures themselves.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from outloop_cli import __version__
from outloop_cli.errors import EXIT_OUTLOOP_FAILED, OutloopError

# Command name -> the module that registers it, and its line in `outloop --help`. Only the invoked group is
# imported (a cron job running `outloop run` every minute should not pay for the audit, secret and doctor modules),
# and the top-level help lists the groups from here without importing them; tests check these lines against the
# help each module registers. The order is the listing's: commands, then groups.
COMMANDS = {
    "run": ("outloop_cli.commands.run",
            "Run COMMAND with a stripped environment and a policy-checking broker; exit with its code."),
    "doctor": ("outloop_cli.commands.doctor",
               "Check the keyring backend (headless too), sandbox layers, paths, the audit database and versions."),
    "audit": ("outloop_cli.commands.audit", "Read the audit log."),
    "workspace": ("outloop_cli.commands.workspace", "List, show, choose, create and check workspace profiles."),
    "secret": ("outloop_cli.commands.secret",
               "Store, list, remove and check secrets (keyring service outloop/<workspace>, user <credential>); "
               "values are never printed."),
    "policy": ("outloop_cli.commands.policy",
               "Test requests against a workspace's policy, draft allow rules from denials, replay the audit against "
               "a draft, and lint the rules."),
    "__complete": ("outloop_cli.commands.complete", ""),  # hidden: the shell completion scripts' callback
}


class _Listing(TyperGroup):
    """The root group: commands whose module was not imported are listed in help from their COMMANDS line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if name in self.commands or COMMANDS[name][1]]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        loaded = super().get_command(ctx, cmd_name)
        if loaded is not None or not COMMANDS.get(cmd_name, ("", ""))[1]:
            return loaded
        return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])  # only listed: a named command is imported


def build_app(argv: Sequence[str] | None = None) -> typer.Typer:
    """The app with the command group `argv` names; every group when `argv` is None, or names an unknown command
    (so the usage error can suggest the nearest); none when it names no command (help and --version)."""
    app = typer.Typer(
        name="outloop",
        help="Run unattended agent loops that never hold a key: a per-run broker checks each API call against "
             "the workspace profile, injects the secret, and audits it.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        cls=_Listing,
    )
    app.callback()(main_options)
    requested = None if argv is None else next((arg for arg in argv if not arg.startswith("-")), "")
    names = [requested] if requested in COMMANDS else [] if requested == "" else list(COMMANDS)
    for name in names:
        importlib.import_module(COMMANDS[name][0]).register(app)
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
