"""Attacks on outloop's own files: an OUTLOOP_HOME another local user pre-created (a shared or /tmp home, an
audit.db and a profile planted in it), links planted at OUTLOOP_HOME, its run dir or its audit.db, and a loop
planting links at the `--summary-json` path and at the temp names a writer might use.

outloop must refuse with exit 125 and a message naming the owner and the fix, for every command, as root and
as an ordinary user; it must never read, write or follow what was planted. Each attack has a positive control:
the same plant fools the writer outloop used before.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest
from conftest import World
from sandbox_support import as_other_user
from state_support import as_user, fingerprint, naive_adopt_home, naive_write_json, plant_home, planter

from adversarial.conftest import run_hostile

# Every command that reads or writes OUTLOOP_HOME; {P} is the test's own profiles dir.
HOME_COMMANDS = [
    ["run", "-w", "acme", "--", "true"],  # the profile lookup in the planted home
    ["run", "-w", "acme", "--profiles", "{P}", "--", "true"],  # the run dir and audit.db
    ["run", "--profiles", "{P}", "--", "true"],  # the planted config.toml's workspace choice
    ["audit"], ["audit", "verify"], ["audit", "events"], ["audit", "show", "last"],
    ["workspace", "use", "acme", "--profiles", "{P}"], ["workspace", "current"], ["workspace", "list"],
    ["secret", "list", "acme"], ["doctor"],
]  # fmt: skip


def _assert_refused(command: list[str], result_code: int, out: str, err: str, owner: str) -> None:
    assert "Traceback" not in out + err
    if command == ["doctor"]:  # doctor lists the refusal as its problem (exit 1) and explains the rest
        assert result_code == 1 and f"owned by {owner}" in out and "nothing in it was read" in out, out + err
        assert "outloop cannot run here: 1 problem" in out + err and "sandbox" in out, out + err
        return
    assert result_code == 125, err
    assert f"owned by {owner}" in err and "OUTLOOP_HOME" in err, err


def test_a_home_another_user_planted_is_refused_for_every_command_and_left_untouched(world: World) -> None:
    other = planter()
    hostile, marker = world.home.parent / "shared", world.home.parent / "planted-cmd-ran"
    plant_home(hostile, other, marker)
    before = fingerprint(hostile)
    env = {**world.env, "OUTLOOP_HOME": str(hostile)}
    for command in HOME_COMMANDS:
        result = world.outloop(*[arg.replace("{P}", str(world.profiles)) for arg in command], env=env)
        _assert_refused(command, result.code, result.out, result.err, f"{other.pw_name} (uid {other.pw_uid})")
    assert fingerprint(hostile) == before  # nothing read (access times), written, created or re-owned
    assert not marker.exists()


def test_control_a_root_that_adopts_a_planted_home_writes_where_its_planter_reads(world: World) -> None:
    other = planter()
    hostile = world.home.parent / "shared"
    plant_home(hostile, other, world.home.parent / "unused")
    naive_adopt_home(hostile)
    read = as_user(other, ["/usr/bin/python3", "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1])"
                           ".execute('SELECT run_id FROM runs').fetchall())", str(hostile / "audit.db")])
    assert "operator-run" in read.stdout, read.stderr


def test_a_non_root_operator_gets_125_and_a_message_not_a_traceback(world: World) -> None:
    other, operator = planter(), as_other_user(world)
    hostile, marker = world.home.parent / "shared", world.home.parent / "planted-cmd-ran"
    plant_home(hostile, other, marker)
    before = fingerprint(hostile)
    env = {**operator.env, "OUTLOOP_HOME": str(hostile)}
    outloop = str(operator.bin_dir / "outloop")
    for command in HOME_COMMANDS:
        argv = [outloop, *[arg.replace("{P}", str(world.profiles)) for arg in command]]
        result = subprocess.run(operator.command(argv), env=env, cwd=world.work, capture_output=True, text=True,
                                timeout=60)
        _assert_refused(command, result.returncode, result.stdout, result.stderr,
                        f"{other.pw_name} (uid {other.pw_uid})")
    assert fingerprint(hostile) == before
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["home", "run dir", "audit.db", "audit.db-wal"])
def test_a_link_at_outloop_home_its_run_dir_or_audit_db_is_refused_never_followed(world: World, planted: str
                                                                                   ) -> None:
    elsewhere, home = world.home.parent / "elsewhere", world.home.parent / "home2"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "audit.db").write_bytes(b"precious, not a database")
    commands = [["run", "-w", "acme", "--profiles", str(world.profiles), "--", "true"]]
    if planted == "home":
        home.symlink_to(elsewhere)
        commands += [["audit", "verify"], ["workspace", "current"]]
    elif planted == "run dir":
        home.mkdir(mode=0o700)
        (home / "run").symlink_to(elsewhere)
    else:
        home.mkdir(mode=0o700)
        (home / planted).symlink_to(elsewhere / "audit.db")  # SQLite would open the -wal by name, following it
        commands += [["audit", "verify"], ["audit"]]
    before = fingerprint(elsewhere)
    for command in commands:
        result = world.outloop(*command, env={**world.env, "OUTLOOP_HOME": str(home)})
        assert result.code == 125 and "is a symbolic link" in result.err, result
        assert "Traceback" not in result.err
    assert fingerprint(elsewhere) == before
    if planted.startswith("audit.db"):
        assert list((home / "run").iterdir()) == []  # the refused run left nothing behind


def test_control_a_naive_opener_follows_a_planted_link(world: World) -> None:
    elsewhere, home = world.home.parent / "elsewhere", world.home.parent / "home2"
    elsewhere.mkdir(mode=0o700)
    home.symlink_to(elsewhere)
    (home / "run" / "01RUN").mkdir(parents=True, exist_ok=True)  # how run dirs were made before
    os.close(os.open(home / "audit.db", os.O_RDWR | os.O_CREAT, 0o600))  # and how audit.db was opened
    assert (elsewhere / "run" / "01RUN").is_dir() and (elsewhere / "audit.db").is_file()


PLANTING_LOOP = """
    import os, sys
    summary, target, missing = sys.argv[1:4]
    directory, name = os.path.split(summary)
    os.symlink(target, summary)  # the final path, pointing at a file outloop can write and the loop cannot
    for guess in (f".{name}.tmp", f"{name}.tmp", f".{name}.swp", f"{name}~", f".{name}.new"):
        os.symlink(missing, os.path.join(directory, guess))
    print("planted")
"""


def test_a_loop_planting_links_at_the_summary_path_and_its_temp_names_redirects_nothing(world: World) -> None:
    precious, missing = world.home.parent / "precious", world.home.parent / "created-through-a-link"
    precious.write_text("precious\n")
    summary = world.work / "summary.json"
    result = run_hostile(world, PLANTING_LOOP, str(summary), str(precious), str(missing),
                         flags=["--summary-json", str(summary)])
    assert result.code == 0 and "planted" in result.out, result.err
    assert precious.read_text() == "precious\n" and not missing.exists()
    assert not summary.is_symlink() and json.loads(summary.read_text())["run_id"] == world.last_run_id()
    assert os.readlink(world.work / ".summary.json.tmp") == str(missing)  # planted, never used
    assert world.outloop("audit", "verify").code == 0


def test_a_summary_link_into_the_audit_database_leaves_it_verifiable(world: World) -> None:
    summary = world.work / "summary.json"
    assert world.run("true").code == 0  # audit.db exists: the loop points the summary at it
    result = run_hostile(world, PLANTING_LOOP, str(summary), str(world.audit_db), str(world.audit_db),
                         flags=["--summary-json", str(summary)])
    assert result.code == 0, result.err
    assert world.outloop("audit", "verify").code == 0
    with sqlite3.connect(world.audit_db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    conn.close()


def test_control_naive_summary_writers_follow_the_planted_links(world: World) -> None:
    precious, missing = world.home.parent / "precious", world.home.parent / "created-through-a-link"
    precious.write_text("precious\n")
    (world.work / ".summary.json.tmp").symlink_to(missing)
    naive_write_json(world.work / "summary.json", {"run_id": "x"})  # the predictable temp name
    assert json.loads(missing.read_text()) == {"run_id": "x"}
    (world.work / "direct.json").symlink_to(precious)
    (world.work / "direct.json").write_text("{}\n")  # writing the final path in place
    assert precious.read_text() == "{}\n"


SWAPPING_LOOP = """
    import os, sys
    out, moved, elsewhere = sys.argv[1:4]
    os.rename(out, moved)
    os.symlink(elsewhere, out)  # the summary's directory is now a link to a directory the loop cannot write
    print("swapped")
"""


def test_the_summary_directory_is_pinned_before_the_loop_can_swap_it(world: World) -> None:
    out, moved, elsewhere = world.work / "out", world.work / "out-moved", world.home.parent / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    result = run_hostile(world, SWAPPING_LOOP, str(out), str(moved), str(elsewhere),
                         flags=["--summary-json", str(out / "summary.json")])
    assert result.code == 0 and "swapped" in result.out, result.err
    assert list(elsewhere.iterdir()) == []
    assert json.loads((moved / "summary.json").read_text())["run_id"] == world.last_run_id()

