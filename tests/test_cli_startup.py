"""Start-up stays cheap by what it imports: help and --version load no command group, a subcommand's help only its
own, and none of them the broker, rich, keyring or psutil; a plain `outloop run` loads no Typer. The lazy top-level
listing says what the groups say, and the plain run line is read as the Typer command reads it.

No timings here: which modules a command imports is what decides its start-up, and that is deterministic.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import typer.main
from conftest import PYTHON, World
from typer import _click as click

from outloop_cli.cli import build_app
from outloop_cli.commands.run_once import FLAGS, parse_run_line

HEAVY = ("aiohttp", "rich", "keyring", "psutil", "psycopg", "asyncio")
PROBE = """
import contextlib, io, json, sys
from outloop_cli.cli import run_cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = run_cli(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def imported_by(*argv: str) -> tuple[int, set[str]]:
    done = subprocess.run([PYTHON, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    return result["code"], set(result["modules"])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_top_level_help_and_version_import_no_command_group(argv: list[str]) -> None:
    code, modules = imported_by(*argv)
    assert code in (0, 2)  # no arguments: help, with click's usage code
    assert not {name for name in modules if name.startswith("outloop_cli.commands")}
    assert not {name for name in modules if name.split(".")[0] in (*HEAVY, "sqlite3", "tomllib")}


@pytest.mark.parametrize("group", ["run", "audit", "workspace", "secret", "doctor", "policy"])
def test_a_subcommands_help_imports_its_own_group_and_nothing_heavy(group: str) -> None:
    code, modules = imported_by(group, "--help")
    assert code == 0
    groups = {name.split(".")[2] for name in modules if name.startswith("outloop_cli.commands.")}
    assert group in groups
    assert groups <= {group, "options", "output", "tables", f"{group}_central", f"{group}_once"}
    assert not {name for name in modules if name.split(".")[0] in HEAVY}
    assert "outloop_cli.runner" not in modules and "outloop_cli.broker.server" not in modules
    if group != "audit":  # their options need no profile schema, nor does their help
        assert "outloop_cli.profiles" not in modules


def test_the_lazy_listing_says_what_each_group_registers() -> None:
    def help_text(app: typer.Typer) -> str:
        group = typer.main.get_command(app)
        return group.get_help(click.Context(group, info_name="outloop"))

    lazy, loaded = help_text(build_app(["--help"])), help_text(build_app())
    assert "Commands:" in lazy and "run " in lazy
    assert lazy == loaded, "a group's help changed: update its line in outloop_cli.cli.COMMANDS"


def test_an_unknown_command_still_gets_the_nearest_suggestion() -> None:
    done = subprocess.run([PYTHON, "-m", "outloop_cli", "wrokspace"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Did you mean 'workspace'?" in done.stderr  # needs every group's name: an unknown word loads them all


def imported_by_a_run(world: World, *flags: str) -> tuple[int, set[str]]:
    """What a real (sandboxed, audited) `outloop run -w acme ... -- true` loaded, in a process of its own."""
    done = subprocess.run([PYTHON, "-c", PROBE, "run", "-w", "acme", "--profiles", str(world.profiles), *flags, "--",
                           "true"], capture_output=True, text=True, timeout=60, env=world.env, cwd=world.work,
                          check=True)
    result = json.loads(done.stdout)
    return result["code"], set(result["modules"])


def test_a_plain_run_loads_neither_typer_nor_rich_nor_the_broker_it_never_needed(world: World) -> None:
    code, modules = imported_by_a_run(world, "--timeout", "1m")
    assert code == 0
    assert world.last_run_id()  # a real run, recorded
    assert "outloop_cli.runner" in modules and "outloop_cli.commands.run_once" in modules
    assert not {name for name in modules if name.split(".")[0] in ("typer", "click", "rich")}
    assert "outloop_cli.commands.run" not in modules  # the Typer command
    assert not {"outloop_cli.audit.store", "outloop_cli.audit.verify"} & modules  # the audit's readers


def test_a_run_the_plain_path_does_not_read_goes_to_the_typer_command(world: World) -> None:
    code, modules = imported_by_a_run(world, "--timeout=1m", "-q")  # `--flag=value` is one it reads
    assert code == 0 and "typer" not in modules
    code, modules = imported_by_a_run(world, "--quiet", "--parallel", "1")  # --each's flag: Typer's to check
    assert code == 0
    assert "typer" in modules and "outloop_cli.commands.run" in modules


def typer_params(args: list[str]) -> dict[str, object]:
    """What the Typer command itself parses from `outloop run ARGS` (click's own parser, no run)."""
    group = typer.main.get_command(build_app(["run"]))
    root = click.Context(group, info_name="outloop")
    command = group.get_command(root, "run")
    assert command is not None
    return command.make_context("run", list(args), parent=root).params


PLAIN_LINES = [
    ["--", "true"],
    ["true", "-w", "x"],  # the command's own flags are never read
    ["-w", "acme", "--", "python", "loop.py", "--", "-q"],
    ["--workspace", "acme", "--profiles", "/p", "--timeout", "90", "--network", "open", "-q", "--", "sh"],
    ["--workspace=acme", "--timeout=1h30m", "--network=broker-only", "--summary-json", "out.json", "loop"],
    ["--quiet", "--batch-id", "01ABC", "-w", "acme", "--", "true"],
    ["-", "x"],  # a lone dash is a word, not a flag
]


@pytest.mark.parametrize("args", PLAIN_LINES)
def test_the_plain_path_reads_a_run_line_as_the_typer_command_does(args: list[str]) -> None:
    line = parse_run_line(args)
    assert line is not None
    expected = typer_params(args)
    # As Typer converts them before it calls the command: click's tuple becomes a list, its str paths Paths.
    expected["command"] = list(expected["command"])
    for key in ("profiles", "summary_json"):
        expected[key] = None if expected[key] is None else Path(str(expected[key]))
    assert {key: expected[key] for key in ("command", "workspace", "profiles", "timeout", "network", "summary_json",
                                           "quiet", "batch_id")} == {
        "command": line.command, "workspace": line.workspace, "profiles": line.profiles, "timeout": line.timeout,
        "network": line.network, "summary_json": line.summary_json, "quiet": line.quiet, "batch_id": line.batch_id}
    assert expected["each"] is None and expected["parallel"] == 1 and not expected["fail_fast"]


@pytest.mark.parametrize("args", [
    [], ["--help"], ["-w", "acme"], ["-w", "acme", "--"], ["--each", "all", "--", "true"], ["--parallel", "2", "true"],
    ["-wacme", "true"], ["-q=1", "true"], ["--quiet=yes", "true"], ["-w", "a", "-w", "b", "true"],
    ["-w", "--", "true"], ["--timeout", "3x", "true"], ["--network", "closed", "true"], ["--network=", "true"],
    ["--bogus", "true"],
])
def test_the_plain_path_leaves_what_it_is_not_sure_of_to_the_typer_command(args: list[str]) -> None:
    assert parse_run_line(args) is None


def test_each_flag_the_plain_path_reads_is_the_typer_commands_flag_for_the_same_parameter() -> None:
    group = typer.main.get_command(build_app(["run"]))
    command = group.get_command(click.Context(group, info_name="outloop"), "run")
    assert command is not None
    typer_flags = {flag: param.name for param in command.params for flag in getattr(param, "opts", [])
                   if flag.startswith("-")}
    assert {flag: typer_flags.get(flag) for flag in FLAGS} == FLAGS


def test_what_a_run_loads_before_its_child_starts_has_no_event_loop_in_it() -> None:
    """The runner's own imports are what `run` pays before the child exists: asyncio, uvloop and the broker stack
    load after the spawn, while the child starts; the audit's readers and the Typer app not at all."""
    done = subprocess.run([PYTHON, "-c", "import json, sys, outloop_cli.commands.run_once, outloop_cli.runner; "
                                         "print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=60, check=True)
    modules = set(json.loads(done.stdout))
    assert not {name for name in modules if name.split(".")[0] in (*HEAVY, "uvloop", "typer", "click")}
    assert not {"outloop_cli.audit.store", "outloop_cli.audit.verify", "outloop_cli.broker.server"} & modules
