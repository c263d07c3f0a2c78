"""Behaviours a contract review asked for: the summary never chokes on the child's text, cwd inside a masked
path is refused up front, /v1/run reports the effective timeout, and bad workspace names record nothing."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest
from conftest import OUTLOOP, World
from sandbox_support import skip_or_fail

from outloop_cli.audit.tally import Counts, Denial, Tally
from outloop_cli.commands.run_once import _rich_summary
from outloop_cli.runner import RunReport


def _report(command: list[str], denials: list[Denial]) -> RunReport:
    return RunReport(
        run_id="01TEST", workspace="acme", command=command, exit_code=3, duration=0.5, started_at=0.0,
        timed_out=False, signal=None, tally=Tally({"crm": Counts(allowed=1, denied=1)}, denials=denials),
        sandbox={"network": "NOT isolated [bold]"}, peak_rss_bytes=0, cpu_seconds=0.0, strays_killed=0,
        audit_head="0" * 64, audit_events=2, audit_db="/tmp/x")


def test_rich_summary_prints_the_childs_text_literally(capsys: pytest.CaptureFixture[str]) -> None:
    denial = Denial("crm", "denied_by_rule", "* /a/[x]", 403, 1)
    _rich_summary(_report(["sh", "-c", "exit 3", "[/]", "[bold]x"], [denial]))
    err = capsys.readouterr().err
    assert "[/]" in err and "[bold]x" in err and "/a/[x]" in err


def test_cwd_inside_a_masked_path_is_refused_before_the_child_starts(world: World) -> None:
    inside = world.home / "profiles"
    result = world.outloop("run", "-w", "acme", "--profiles", str(world.profiles), "--", "true")
    assert result.code == 0


    completed = subprocess.run([OUTLOOP, "run", "-w", "acme", "--profiles", str(world.profiles), "--", "true"],
                               capture_output=True, text=True, env=world.env, cwd=inside, timeout=60)
    if "NOT hidden" in completed.stderr:
        skip_or_fail("no mount namespace on this machine")
    assert completed.returncode == 125
    assert "which the sandbox hides from the child" in completed.stderr


def test_run_info_reports_the_effective_timeout(world: World) -> None:
    result = world.run_loop("""
        import json
        from outloop_cli.client import Outloop
        print(json.dumps(Outloop().run_info()["limits"]))
    """, flags=["--timeout", "90s"])
    assert json.loads(result.out)["timeout"] == 90.0


def test_a_bad_workspace_name_is_refused_and_records_nothing(world: World) -> None:
    assert world.run("true").code == 0  # the audit database exists, so a recorded failed start would show
    result = world.run("true", workspace="Bad Name")
    assert result.code == 125
    assert "not a valid workspace name" in result.err
    conn = sqlite3.connect(world.audit_db)
    try:
        assert conn.execute("SELECT workspace FROM runs").fetchall() == [("acme",)]
    finally:
        conn.close()
