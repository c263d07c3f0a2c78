"""Start-up stays cheap by what it imports: help and --version load no command group, a subcommand's help only its
own, and none of them the broker, rich, keyring or psutil. The lazy top-level listing says what the groups say.

No timings here: which modules a command imports is what decides its start-up, and that is deterministic.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import typer.main
from conftest import PYTHON
from typer import _click as click

from outloop_cli.cli import build_app

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
    assert groups <= {group, "options", "output", "tables", f"{group}_central"}
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
