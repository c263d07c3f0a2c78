"""Audit tampering: a hostile child reaching for the log, and someone with write access to audit.db editing it.

The child cannot reach audit.db (hidden; the broker's /proc entries are closed to it): proven here and in
tests/adversarial/test_hostile_child_paths.py. An outside writer's edits, deletions and truncation are
caught by `outloop audit verify`; a writer who recomputes the whole chain is not, and only the head hash the
run printed in its summary (stderr, cron mail, --summary-json) gives that away: the chain is unkeyed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import World
from operator_support import rewrite_consistently

from adversarial.conftest import run_hostile

FORGING_LOOP = """
    import json
    from outloop_cli.client import Outloop
    client = Outloop()
    # Things an audit reader might be fooled by: forged-looking names, control bytes, sheer length.
    client.request("crm", "GET", "/crm/v3/objects/contacts/1")
    client.request("crm" + "x" * 5000, "GET", "/x")
    client.request("crm", "GET", "/crm/v3/objects/contacts/" + "%0A" + "decision=allow")
    client.request("crm", "GET", "/crm/v3/objects/contacts/1?token=cnry-looks-like-a-secret&decision=allow")
    client.request("crm", "DELETE", "/crm/v3/objects/contacts/" + "a" * 4000)
"""

TAMPERING = {
    "edit a decision": "UPDATE events SET decision = 'allow' WHERE kind = 'request' AND decision = 'deny' AND seq = "
                       "(SELECT min(seq) FROM events WHERE decision = 'deny')",
    "edit a path": "UPDATE events SET path = '/harmless' WHERE kind = 'request' AND seq = 1",
    "delete a denial": "DELETE FROM events WHERE seq = (SELECT min(seq) FROM events WHERE decision = 'deny')",
    "truncate the tail": "DELETE FROM events WHERE seq >= (SELECT max(seq) - 1 FROM events)",
    "delete the runs row": "DELETE FROM runs",
}


@pytest.fixture
def finished_run(world: World) -> tuple[World, str]:
    result = run_hostile(world, FORGING_LOOP, flags=["--summary-json", str(world.work / "summary.json")])
    assert result.code == 0, result.err
    return world, json.loads((world.work / "summary.json").read_text())["audit_head"]


def _verify_copy(world: World, name: str, sql: str | None = None) -> tuple[int, dict[str, object]]:
    home = world.home.parent / f"tampered-{name.replace(' ', '-')}"
    home.mkdir(mode=0o700)
    shutil.copyfile(world.audit_db, home / "audit.db")
    if sql:
        with sqlite3.connect(home / "audit.db") as conn:
            conn.execute(sql)
    result = world.outloop("audit", "verify", "--json", env={**world.env, "OUTLOOP_HOME": str(home)})
    return result.code, json.loads(result.out)


def test_the_log_records_hostile_input_harmlessly(finished_run: tuple[World, str]) -> None:
    world, _ = finished_run
    events = world.events()
    assert len(events) == 5
    assert [e["decision"] for e in events] == ["allow", "deny", "deny", "allow", "deny"]
    assert len(str(events[1]["credential"])) <= 67 and len(str(events[4]["path"])) <= 1027  # truncated
    assert events[2]["reason"] == "control_char"
    assert b"cnry-looks-like-a-secret" not in world.audit_bytes()  # query values are never stored
    assert all("\n" not in str(e["path"]) for e in events)


def test_edits_deletions_and_truncation_by_an_outside_writer_are_detected(finished_run: tuple[World, str]) -> None:
    world, _ = finished_run
    assert _verify_copy(world, "untouched")[0] == 0
    caught = {name: _verify_copy(world, name, sql) for name, sql in TAMPERING.items()}
    missed = {name: report for name, (code, report) in caught.items() if code != 1 or report["broken"] != 1}
    assert missed == {}


def test_a_consistent_rewrite_passes_verify_but_not_the_summary_head(finished_run: tuple[World, str]) -> None:
    """The documented limit: the chain is unkeyed, so a writer who rehashes everything is invisible to verify.
    The head hash the run printed at exit (summary, --summary-json, cron mail) is the anchor that exposes it."""
    world, printed_head = finished_run
    home = world.home.parent / "rewritten"
    home.mkdir(mode=0o700)
    shutil.copyfile(world.audit_db, home / "audit.db")
    head = rewrite_consistently(home / "audit.db", world.last_run_id())
    result = world.outloop("audit", "verify", "--json", env={**world.env, "OUTLOOP_HOME": str(home)})
    assert result.code == 0 and json.loads(result.out)["broken"] == 0  # verify alone cannot tell
    assert head != printed_head  # the head printed when the run ended can
    assert Path(home / "audit.db").exists()
