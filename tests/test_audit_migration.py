"""An audit.db written by the schema-1 writer (tests/data/make_schema1_db.py) is upgraded in place on first use.

Its stored events are covered by the hash chain, so the upgrade must not touch them: old runs still verify, their
outcomes are joined to their requests, and their failed outcomes are counted like new ones.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from conftest import World

from outloop_cli.audit.schema import DEFAULT_BUSY_TIMEOUT, MIGRATIONS, SCHEMA_VERSION, open_rw

FIXTURE = Path(__file__).parent / "data" / "audit-schema1.db"
RUN_A, RUN_B, RUN_C = "01J0000000000000000000000A", "01J0000000000000000000000B", "01J0000000000000000000000C"


def stored_events(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM events ORDER BY run_id, seq").fetchall()


def user_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def test_a_schema_1_database_is_upgraded_in_place_and_still_verifies(world: World) -> None:
    shutil.copyfile(FIXTURE, world.audit_db)
    before = stored_events(world.audit_db)
    assert user_version(world.audit_db) == 1 and len(before) == 13

    runs = {run["run_id"]: run for run in json.loads(world.outloop("audit", "--json").out)}
    assert user_version(world.audit_db) == SCHEMA_VERSION
    assert stored_events(world.audit_db) == before  # every hashed column as it was
    assert {run_id: (run["allowed"], run["errors"], run["denied"], run["state"]) for run_id, run in runs.items()} == {
        RUN_A: (2, 1, 1, "ended"), RUN_B: (1, 1, 0, "ended"), RUN_C: (1, 0, 0, "no end")}

    verified = world.outloop("audit", "verify")
    assert verified.code == 0, verified.out
    assert verified.out.splitlines()[-1] == "3 runs: 2 ok, 1 incomplete, 0 pruned, 0 broken"

    failed = json.loads(world.outloop("audit", "events", "--failed", "--json").out)
    assert sorted((e["run_id"], e["path"], e["outcome"]["status"]) for e in failed) == [
        (RUN_A, "/contacts/2", 401), (RUN_B, "/invoices", 502)]
    assert [run["run_id"] for run in json.loads(world.outloop("audit", "--failed", "--json").out)] == [RUN_C, RUN_B,
                                                                                                       RUN_A]
    shown = json.loads(world.outloop("audit", "show", RUN_A, "--json").out)
    assert [(e["path"], e["result"]) for e in shown["events"] if e["kind"] == "request"] == [
        ("/contacts/1", "ok"), ("/contacts/2", "error"), ("/contacts/2", "denied")]
    pending = json.loads(world.outloop("audit", "show", RUN_C, "--json").out)
    assert [e["result"] for e in pending["events"] if e["kind"] == "request"] == ["pending"]


def test_new_runs_append_to_an_upgraded_database(world: World) -> None:
    shutil.copyfile(FIXTURE, world.audit_db)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        assert Outloop().request("crm", "GET", "/crm/v3/objects/contacts/1").status == 200
    """)
    assert result.code == 0, result.err
    assert user_version(world.audit_db) == SCHEMA_VERSION
    verified = world.outloop("audit", "verify")
    assert verified.code == 0 and verified.out.splitlines()[-1] == "4 runs: 3 ok, 1 incomplete, 0 pruned, 0 broken"
    newest = json.loads(world.outloop("audit", "show", "last", "--json").out)
    assert (newest["allowed"], newest["errors"]) == (1, 0)


def indexes(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return {str(name): str(sql) for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


def as_released_at(db: Path, version: int) -> None:
    """Bring the schema-1 fixture to ``version`` with the migrations as that release applied them."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for migration in MIGRATIONS[user_version(db):version]:
            migration(conn)
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


def test_a_schema_4_database_gets_the_lean_indexes_and_its_filters_answer_as_before(world: World) -> None:
    """Schema 5 replaced the decision, credential and status indexes with partial ones; the filters they served must
    find the same events in an upgraded file, and the file must end up shaped like a new one."""
    shutil.copyfile(FIXTURE, world.audit_db)
    as_released_at(world.audit_db, 4)
    assert {"events_by_decision", "events_by_workspace_decision", "events_by_credential"} <= set(
        indexes(world.audit_db))
    before = stored_events(world.audit_db)

    def requests(*flags: str) -> list[tuple[object, ...]]:
        found = json.loads(world.outloop("audit", "events", "--json", *flags).out)
        return sorted((e["run_id"][-1], e["seq"]) for e in found)

    assert requests("--decision", "deny") == [("A", 5)]
    assert user_version(world.audit_db) == SCHEMA_VERSION
    assert stored_events(world.audit_db) == before
    fresh = world.home / "fresh.db"
    open_rw(fresh, DEFAULT_BUSY_TIMEOUT).close()
    assert indexes(world.audit_db) == indexes(fresh)

    assert requests("--decision", "allow") == [("A", 1), ("A", 3), ("B", 1), ("C", 1)]
    assert requests("--workspace", "acme", "--decision", "deny") == [("A", 5)]
    assert requests("--workspace", "globex", "--decision", "deny") == []
    assert requests("--credential", "billing") == [("B", 1)]
    assert requests("--credential", "crm", "--decision", "allow") == [("A", 1), ("A", 3), ("C", 1)]
    assert requests("--status", "4xx") == [("A", 3), ("A", 5)]
    assert requests("--status", "401,502") == [("A", 3), ("B", 1)]
    assert requests("--status", "200") == [("A", 1)]
    assert requests("--failed", "--workspace", "acme") == [("A", 3)]
    runs = {
        flag: [run["run_id"][-1] for run in json.loads(world.outloop("audit", "--json", "--status", flag).out)]
        for flag in ("200", "2xx", "403", "5xx", "301")}
    assert runs == {"200": ["A"], "2xx": ["A"], "403": ["A"], "5xx": ["B"], "301": []}
