"""The Typer app: wires the command groups and turns OutloopError into a message and an exit code.

This is the only place errors become output; commands and core raise, they never print failures themselves.
Typer itself loads only when the app is built: a plain `outloop run` is read without it (`commands/run_once.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from outloop_cli import __version__
from outloop_cli.errors import EXIT_OUTLOOP_FAILED, OutloopError

if TYPE_CHECKING:
    import typer
    from typer.core import TyperGroup

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


@functools.cache
def _listing() -> type[TyperGroup]:
    """The root group's class, made when the Typer app is (Typer loads only where the app is needed)."""
    from typer import _click as click
    from typer.core import TyperCommand, TyperGroup

    class Listing(TyperGroup):
        """The root group: commands whose module was not imported are listed in help from their COMMANDS line."""

        def list_commands(self, ctx: click.Context) -> list[str]:
            return [name for name in COMMANDS if name in self.commands or COMMANDS[name][1]]

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            loaded = super().get_command(ctx, cmd_name)
            if loaded is not None or not COMMANDS.get(cmd_name, ("", ""))[1]:
                return loaded
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])  # only listed: a named command is imported

    return Listing


def build_app(argv: Sequence[str] | None = None) -> typer.Typer:
    """The app with the command group `argv` names; every group when `argv` is None, or names an unknown command
    (so the usage error can suggest the nearest); none when it names no command (help and --version)."""
    import typer

    app = typer.Typer(
        name="outloop",
        help="Run unattended agent loops that never hold a key: a per-run broker checks each API call against "
             "the workspace profile, injects the secret, and audits it.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        cls=_listing(),
    )
    app.callback()(_main_options())
    requested = None if argv is None else next((arg for arg in argv if not arg.startswith("-")), "")
    names = [requested] if requested in COMMANDS else [] if requested == "" else list(COMMANDS)
    for name in names:
        importlib.import_module(COMMANDS[name][0]).register(app)
    return app


def _version(value: bool) -> None:
    if value:
        import typer

        print(f"outloop {__version__}")
        raise typer.Exit()


def _main_options() -> Callable[..., None]:
    import typer

    def main_options(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version and exit."),
    ) -> None:
        """outloop: secrets stay with the broker, never with the loop."""

    return main_options


def run_cli(argv: Sequence[str]) -> int:
    """Run outloop with `argv` (without the program name) and return its exit code; errors are printed here."""
    try:
        if argv[:1] == ["run"]:
            from outloop_cli.commands.run_once import parse_run_line, run_once

            line = parse_run_line(argv[1:])  # a plain run needs no Typer app (see run_once)
            if line is not None:
                return run_once(line)
        return _run_app(argv)
    except OutloopError as exc:
        print(f"outloop: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run_app(argv: Sequence[str]) -> int:
    import typer

    try:
        # Non-standalone click returns the code of typer.Exit instead of raising it.
        code = build_app(argv)(args=list(argv), prog_name="outloop", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("outloop: aborted", file=sys.stderr)
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
    code = run_cli(sys.argv[1:])
    if sys.argv[1:2] == ["run"]:
        _exit_without_teardown(code)
    sys.exit(code)


def _exit_without_teardown(code: int) -> None:
    """End a finished run without the interpreter's teardown, which frees every object of every module the run
    loaded (~35 ms here, a quarter of `run -- true`'s cost) only for the process to end anyway.

    By now the audit is committed, --summary-json written and closed, and the summary printed; what a normal exit
    would still do is done here: the exit handlers run and the output is flushed. Where a thread other than a
    daemon is still alive, a normal exit waits for it, so this returns and lets it.
    """
    main = threading.main_thread()
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate() if thread is not main):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: the exit code still says how the run went
            stream.flush()
    os._exit(code)


def _usage_exit_code(argv: Sequence[str], click_code: int) -> int:
    """`outloop run` keeps 1-123 for the child, so its own usage errors are 125 like coreutils `timeout`."""
    return EXIT_OUTLOOP_FAILED if argv and argv[0] == "run" else click_code
