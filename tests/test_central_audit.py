"""Fleet audit: two hosts (two OUTLOOP_HOMEs with their own host_id) ship to one real PostgreSQL.

The server is Debian's, started by tests/postgres_support.py; nothing of outloop's or of the database is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import OUTLOOP, World, make_world
from operator_support import ACME_LOOP, GLOBEX_LOOP, rewrite_consistently, wait_for
from postgres_support import PASSWORD_VARIABLE, Postgres, postgres, ship_to  # noqa: F401  (postgres: the session fixture)
from sandbox_support import require_layer

from outloop_cli.audit.central_probe import unreachable
from outloop_cli.audit.store import EVENT_COLUMNS

CHAIN = ", ".join((*EVENT_COLUMNS, "hash"))


@pytest.fixture
def fleet(postgres: Postgres) -> Iterator[tuple[World, World, str]]:  # noqa: F811
    """Two hosts pointed at a fresh central database, initialised from the first."""
    dbname = postgres.create_database()
    with make_world() as cron, make_world() as ci:
        ship_to(cron, postgres, dbname, "cron-01")
        ship_to(ci, postgres, dbname, "ci-runner")
        init = cron.outloop("audit", "central", "init")
        assert init.code == 0, init.combined
        yield cron, ci, dbname


def central_rows(server: Postgres, dbname: str, host_id: str) -> list[tuple[object, ...]]:
    with server.connect(dbname) as conn:
        return conn.execute(f"SELECT {CHAIN} FROM outloop.events WHERE host_id = %s ORDER BY run_id, seq",
                            (host_id,)).fetchall()


def local_rows(world: World) -> list[tuple[object, ...]]:
    import sqlite3

    with sqlite3.connect(world.audit_db) as conn:
        return conn.execute(f"SELECT {CHAIN} FROM events ORDER BY run_id, seq").fetchall()


def as_json(world: World, *args: str) -> object:
    result = world.outloop(*args, "--json")
    assert result.code == 0, result.combined
    return json.loads(result.out)


def test_two_hosts_ship_and_the_central_queries_show_both(postgres: Postgres,  # noqa: F811
                                                          fleet: tuple[World, World, str]) -> None:
    cron, ci, dbname = fleet
    ran = cron.run_loop(ACME_LOOP)
    assert ran.code == 0 and "central    shipped" in ran.err, ran.err  # shipped at the end of the run
    assert ci.run_loop(GLOBEX_LOOP, workspace="globex").code == 3
    assert ci.run_loop(ACME_LOOP).code == 0
    for host in (cron, ci):
        shipped = as_json(host, "audit", "ship")
        assert shipped["sent"] == 0 and shipped["backlog_events"] == 0  # each run shipped itself already
    assert central_rows(postgres, dbname, "cron-01") == local_rows(cron)  # an exact copy, hashes included
    assert central_rows(postgres, dbname, "ci-runner") == local_rows(ci)

    runs = as_json(cron, "audit", "--central")
    assert sorted((r["host_id"], r["workspace"], r["exit_code"]) for r in runs) == [
        ("ci-runner", "acme", 0), ("ci-runner", "globex", 3), ("cron-01", "acme", 0)]
    local = as_json(cron, "audit", "show", "last")
    assert [(r["run_id"], r["head_hash"], r["event_count"]) for r in runs if r["host_id"] == "cron-01"] == [
        (local["run_id"], local["head_hash"], local["event_count"])]
    denied = as_json(ci, "audit", "events", "--central", "--decision", "deny", "--since", "7d")
    assert sorted({e["host_id"] for e in denied}) == ["ci-runner", "cron-01"]
    assert all(e["decision"] == "deny" for e in denied) and len(denied) == 2 + 1 + 2
    acme_only = as_json(ci, "audit", "events", "--central", "--workspace", "acme", "--credential", "crm")
    assert {e["workspace"] for e in acme_only} == {"acme"} and len(acme_only) == 2 * 5
    shown = as_json(ci, "audit", "show", "--central", cron.last_run_id()[:20])
    assert shown["host_id"] == "cron-01" and shown["state"] == "ended"
    assert (shown["events_total"], shown["events"]) == (local["events_total"], local["events"])  # outcomes joined
    assert as_json(cron, "audit", "--central", "--batch", "01NOBATCH") == []  # filtered, not ignored
    table = cron.outloop("audit", "--central")
    assert table.code == 0 and "host" in table.out.splitlines()[0] and "ci-runner" in table.out

    verified = cron.outloop("audit", "verify", "--central", "--json")
    assert verified.code == 0 and json.loads(verified.out)["ok"] == 3, verified.combined
    again = ci.outloop("audit", "central", "init")
    assert again.code == 0 and "is current (version 1)" in again.out  # safe to repeat, from any host
    for host in (cron, ci):
        against = host.outloop("audit", "verify", "--against-central")
        assert against.code == 0, against.combined
    for host in (cron, ci):
        host.assert_no_canary(postgres.password)
        assert all(postgres.password not in text for text in host.seen_output)


# Allowed requests the upstream fails (503, 404), one it answers, one the broker denies: every filter has rows.
FAILING_LOOP = """
    from outloop_cli.client import Outloop
    client = Outloop()
    assert client.request("billing", "GET", "/status/503").status == 503
    assert client.request("billing", "GET", "/status/404").status == 404
    assert client.request("crm", "GET", "/crm/v3/objects/contacts/1").status == 200
    assert client.request("billing", "DELETE", "/invoices/1").denied
"""


def listed(world: World, *args: str) -> list[dict[str, object]]:
    records = as_json(world, *args)
    assert isinstance(records, list)
    return records


def _by_key(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return sorted(({k: v for k, v in r.items() if k != "host_id"} for r in records),
                  key=lambda r: (str(r["run_id"]), int(r.get("seq") or 0)))


@pytest.mark.parametrize(("filters", "runs"), [
    (["--failed"], 3), (["--status", "5xx"], 2), (["--status", "403,404"], 4),
    (["--status", "200", "--workspace", "acme"], 1), (["--failed", "--workspace", "globex"], 3)])
def test_failed_and_status_filters_answer_centrally_what_each_host_answers_locally(
        fleet: tuple[World, World, str], filters: list[str], runs: int) -> None:
    """The central copy filters as the union of the hosts' local audits does: the same requests and runs."""
    cron, ci, _ = fleet
    assert cron.run_loop(ACME_LOOP).code == 0
    assert cron.run_loop(FAILING_LOOP, workspace="globex").code == 0
    assert ci.run_loop(GLOBEX_LOOP, workspace="globex").code == 3
    assert ci.run_loop(FAILING_LOOP, workspace="globex").code == 0
    local = [record for host in (cron, ci) for record in listed(host, "audit", "events", *filters)]
    central = listed(cron, "audit", "events", "--central", *filters)
    assert _by_key(central) == _by_key(local), filters
    # Every filter here matches something, so an ignored filter would show as extra rows, never as a pass.
    assert 0 < len(central) < len(listed(cron, "audit", "events", "--central"))

    local_runs = {r["run_id"] for host in (cron, ci) for r in listed(host, "audit", *filters)}
    central_runs = {r["run_id"] for r in listed(cron, "audit", "--central", *filters)}
    assert central_runs == local_runs and len(central_runs) == runs, (filters, central_runs)


def test_an_edited_or_deleted_central_row_is_detected(postgres: Postgres,  # noqa: F811
                                                      fleet: tuple[World, World, str]) -> None:
    cron, ci, dbname = fleet
    assert cron.run_loop(ACME_LOOP).code == 0
    assert ci.run_loop(ACME_LOOP).code == 0
    victim = cron.last_run_id()
    with postgres.connect(dbname) as conn:
        conn.execute("UPDATE outloop.events SET decision = 'allow' WHERE host_id = 'cron-01' AND run_id = %s "
                     "AND seq = 4", (victim,))
    verified = cron.outloop("audit", "verify", "--central", "--json")
    report = json.loads(verified.out)
    assert verified.code == 1 and report["broken"] == 1 and report["ok"] == 1
    broken = next(v for v in report["verdicts"] if v["status"] == "broken")
    assert (broken["host_id"], broken["run_id"], broken["first_bad_seq"]) == ("cron-01", victim, 4)
    text = cron.outloop("audit", "verify", "--central")
    assert text.code == 1 and f"host cron-01: BROKEN      run {victim} at event 4" in text.out

    other = ci.last_run_id()
    with postgres.connect(dbname) as conn:
        conn.execute("DELETE FROM outloop.events WHERE host_id = 'ci-runner' AND run_id = %s AND seq >= 5", (other,))
    # The central walk sees a run without its end; the host that shipped it knows more was sent.
    assert ci.outloop("audit", "verify", "--central").code == 1  # still the cron-01 edit
    against = ci.outloop("audit", "verify", "--against-central", "--json")
    assert against.code == 1, against.combined
    (verdict,) = [v for v in json.loads(against.out)["verdicts"] if v["status"] == "broken"]
    assert verdict["run_id"] == other and "deleted centrally" in verdict["problem"]


def test_a_consistent_local_rewrite_after_shipping_is_caught_against_central(
        postgres: Postgres, fleet: tuple[World, World, str]) -> None:  # noqa: F811
    cron, _, dbname = fleet
    password_file = cron.home.parent / "central-password"  # outside the loop's working directory
    password_file.write_text(postgres.password + "\n")
    password_file.chmod(0o600)
    ship_to(cron, postgres, dbname, "cron-01", password=f"file:{password_file}")
    assert cron.run_loop(ACME_LOOP).code == 0
    assert cron.run_loop(ACME_LOOP).code == 0
    rewritten = cron.last_run_id()
    rewrite_consistently(cron.audit_db, rewritten)
    assert cron.outloop("audit", "verify").code == 0  # the local verify alone cannot tell
    against = cron.outloop("audit", "verify", "--against-central", "--json")
    assert against.code == 1, against.combined
    report = json.loads(against.out)
    (verdict,) = [v for v in report["verdicts"] if v["status"] == "broken"]
    assert verdict["run_id"] == rewritten and "rewritten after shipping" in verdict["problem"]
    assert report["ok"] == 1


# A stop in the middle of a batch: once three batches are in, the next INSERT waits on a lock the test holds.
_BLOCK_FOURTH_BATCH = """
    CREATE FUNCTION outloop.block() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF (SELECT count(*) FROM outloop.events) >= 300 THEN PERFORM pg_advisory_xact_lock(4242); END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER block BEFORE INSERT ON outloop.events FOR EACH STATEMENT EXECUTE FUNCTION outloop.block();
"""
MANY_REQUESTS_LOOP = """
    from outloop_cli.client import Outloop
    client = Outloop()
    for i in range(300):
        client.request("crm", "GET", f"/crm/v3/objects/contacts/{i}")
        client.request("crm", "DELETE", f"/crm/v3/objects/contacts/{i}")
"""


def test_a_shipper_killed_mid_batch_leaves_no_gap_and_no_duplicate(postgres: Postgres,  # noqa: F811
                                                                   fleet: tuple[World, World, str]) -> None:
    cron, _, dbname = fleet
    offline = {**cron.env, PASSWORD_VARIABLE: "wrong"}
    assert cron.run_loop(MANY_REQUESTS_LOOP, env=offline).code == 0  # not shipped at its end: bad password
    assert cron.run_loop(ACME_LOOP, env=offline).code == 0
    expected = local_rows(cron)
    assert len(expected) > 900
    with postgres.connect(dbname) as admin, postgres.connect(dbname) as holder:
        admin.execute(_BLOCK_FOURTH_BATCH)
        holder.execute("SELECT pg_advisory_lock(4242)")
        shipper = subprocess.Popen([OUTLOOP, "audit", "ship", "--batch-size", "100"], env=cron.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND application_name = 'outloop cron-01'").fetchone()[0] == 1,
                 timeout=120)
        os.kill(shipper.pid, signal.SIGKILL)
        shipper.wait()
        assert len(central_rows(postgres, dbname, "cron-01")) == 300  # three whole batches, nothing of the 4th
        holder.execute("SELECT pg_advisory_unlock(4242)")
        admin.execute("DROP TRIGGER block ON outloop.events")
    backlog = as_json(cron, "audit", "ship", "--batch-size", "100")
    assert backlog["sent"] == len(expected) - 300 and backlog["backlog_events"] == 0
    assert central_rows(postgres, dbname, "cron-01") == expected
    assert as_json(cron, "audit", "ship")["sent"] == 0  # idempotent
    assert cron.outloop("audit", "verify", "--central").code == 0


def test_with_the_server_down_runs_are_unaffected_and_ship_catches_up(postgres: Postgres,  # noqa: F811
                                                                      fleet: tuple[World, World, str]) -> None:
    cron, _, dbname = fleet
    cron.set_keyring("audit.central", "password", postgres.password)
    ship_to(cron, postgres, dbname, "cron-01", password="keyring")
    postgres.stop()
    try:
        down = [cron.run_loop(ACME_LOOP), cron.run_loop(GLOBEX_LOOP, workspace="globex")]
        assert [r.code for r in down] == [0, 3]
        assert all("central    not shipped: cannot connect" in r.err for r in down), down[0].err
        waiting = len(local_rows(cron))
        ship = cron.outloop("audit", "ship")
        assert ship.code == 4 and f"backlog kept locally: {waiting} events in 2 runs" in ship.err, ship.combined
        assert f"{waiting} events in 2 runs" in cron.outloop("doctor").out
    finally:
        postgres.start()
    caught_up = as_json(cron, "audit", "ship")
    assert caught_up["sent"] == waiting and caught_up["runs"] == 2 and caught_up["backlog_events"] == 0
    assert central_rows(postgres, dbname, "cron-01") == local_rows(cron)
    cron.assert_no_canary(postgres.password)


@pytest.mark.parametrize(("table", "message"), [
    ('[audit.central]\nhost_id = "x"\n', "audit.central.dsn is missing"),
    ('[audit.central]\ndsn = "postgresql://a@b/c"\nport = 5\n', "unknown key audit.central.port"),
    ('[audit.central]\ndsn = "postgresql://a@b/c"\npassword = "hunter2"\n', "names where the password lives"),
])
def test_a_bad_central_table_is_named_with_its_key(world: World, table: str, message: str) -> None:
    (world.home / "config.toml").write_text(table)
    result = world.outloop("audit", "ship")
    assert result.code == 2 and message in result.err and "config.toml" in result.err, result.combined
    assert "hunter2" not in result.combined
    assert world.run("true").code == 0  # a run never fails over shipping


def test_ship_without_a_central_table_says_how_to_add_one(world: World) -> None:
    result = world.outloop("audit", "ship")
    assert result.code == 2 and "[audit.central]" in result.err


def test_the_end_of_run_probe_only_answers_certainly_down_or_try(tmp_path: Path) -> None:
    """A server that is plainly down is named without psycopg; anything the probe cannot read is left to libpq."""
    socket_dir = tmp_path / "sockets"
    socket_dir.mkdir()
    assert unreachable(f"host={socket_dir} port=5432 dbname=outloop", 1.0) == (
        f"no server socket at {socket_dir}/.s.PGSQL.5432")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: a connection is refused
        assert "Connection refused" in str(unreachable(f"postgresql://u@127.0.0.1:{port}/db", 1.0))
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            assert unreachable(f"postgresql://u@127.0.0.1:{listening.getsockname()[1]}/db", 1.0) is None
    for unreadable in ("postgresql://u@a,b/db", "postgresql:///db", "service=audit", "postgresql://u@h/db?host=/x"):
        assert unreachable(unreadable, 1.0) is None


def test_a_loop_cannot_read_the_central_password_file(world: World) -> None:
    """The central database's password is a secret like any credential's: a `file:` source is kept out of the
    loop's view. Positive control: until config.toml names it, the loop reads the same file."""
    require_layer("user_namespaces")
    password = world.work / "central-password"
    password.write_text("cnry-central-file\n")
    password.chmod(0o600)
    loop = f"print(open({str(password)!r}).read().strip())"
    assert "cnry-central-file" in world.run_loop(loop).out  # not a secret yet: the loop reads it
    (world.home / "config.toml").write_text(
        f'[audit.central]\ndsn = "postgresql://u@127.0.0.1:1/db"\npassword = "file:{password}"\n')
    refused = world.run_loop(loop)
    assert refused.code == 125 and f"contains the secret file {password}" in refused.err, refused.combined
    assert "cnry-central-file" not in refused.out + refused.err
