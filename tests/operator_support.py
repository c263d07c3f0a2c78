"""Helpers for the operator-command tests: a real audit DB built by real runs, and ways to tamper with copies.

Building the DB costs seconds (real `outloop run`s), so read-only tests share one (the `audited_world` fixture)
and tampering tests work on copies made with SQLite's backup API, which carries the WAL's content along.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import sqlite3
import struct
import subprocess
import termios
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from conftest import OUTLOOP, PYTHON, World

from outloop_cli.audit.chain import EVENT_COLUMNS, GENESIS_HASH, event_hash

# Three allowed requests and two denied ones (a deny rule, and no matching rule), then exit 0.
ACME_LOOP = """
    from outloop_cli.client import Outloop
    client = Outloop()
    for i in range(3):
        assert client.request("crm", "GET", f"/crm/v3/objects/contacts/{i}").status == 200
    assert client.request("crm", "POST", "/crm/v3/objects/contacts/1/merge").denied
    assert client.request("crm", "DELETE", "/crm/v3/objects/contacts/1").denied
"""
# One allowed and one denied request, then exit 3: the listing must show a failed run.
GLOBEX_LOOP = """
    from outloop_cli.client import Outloop
    client = Outloop()
    assert client.request("crm", "GET", "/crm/v3/objects/contacts/7").status == 200
    assert client.request("billing", "DELETE", "/invoices/1").denied
    raise SystemExit(3)
"""
CONCURRENT_RUNS = 20


@dataclass(frozen=True)
class AuditedWorld:
    """A World whose audit.db holds real runs: `finished` (oldest first) and one `killed` with SIGKILL."""

    world: World
    finished: list[str]
    killed: str


def fill_audit(world: World) -> AuditedWorld:
    """20 concurrent real runs (acme and globex alternating), then one run killed with SIGKILL mid-way."""
    loops = [(ACME_LOOP, "acme") if n % 2 == 0 else (GLOBEX_LOOP, "globex") for n in range(CONCURRENT_RUNS)]
    with ThreadPoolExecutor(CONCURRENT_RUNS) as pool:
        # Twenty runs at once on a busy two-core machine take about a minute: give each more than that.
        results = list(pool.map(lambda loop: world.run_loop(loop[0], workspace=loop[1], timeout=180), loops))
    assert [r.code for r in results] == [0 if n % 2 == 0 else 3 for n in range(CONCURRENT_RUNS)], results
    finished = run_ids(world.audit_db)
    killed = kill_a_run(world)
    return AuditedWorld(world, finished, killed)


def run_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT run_id FROM runs ORDER BY started_at")]


def start_run(world: World, source: str, workspace: str = "acme") -> subprocess.Popen[bytes]:
    """`outloop run` in its own session (so the whole tree can be killed), not waited for."""
    script = world.work / f"loop-{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen([OUTLOOP, "run", "-w", workspace, "--profiles", str(world.profiles), "--", PYTHON,
                             str(script)], env=world.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=world.work)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `condition`; a database that exists before its schema does (a run just starting) counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except sqlite3.OperationalError:
            pass
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def kill_a_run(world: World) -> str:
    """A run that made one request and was then killed with SIGKILL, outloop and child together."""
    marker = world.work / "requested"
    process = start_run(world, f"""
        import time
        from outloop_cli.client import Outloop
        Outloop().request("crm", "GET", "/crm/v3/objects/contacts/99")
        open({str(marker)!r}, "w").close()
        time.sleep(60)
    """)
    wait_for(marker.exists)
    # The outcome is committed with the next decision or within 100 ms: kill once it is, so the run has 3 events.
    wait_for(lambda: _response_count(world.audit_db) == 1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with sqlite3.connect(world.audit_db) as conn:
        return str(conn.execute("SELECT run_id FROM runs WHERE ended_at IS NULL").fetchone()[0])


def _response_count(db: Path) -> int:
    """Response events of unfinished runs (the one run kill_a_run started)."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE kind = 'response' AND run_id IN "
                                "(SELECT run_id FROM runs WHERE ended_at IS NULL)").fetchone()[0])


def copy_home(world: World, name: str) -> Path:
    """A new OUTLOOP_HOME holding a consistent copy of the world's audit.db, to tamper with."""
    home = world.work / name
    home.mkdir()
    source = sqlite3.connect(world.audit_db)
    target = sqlite3.connect(home / "audit.db")
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    return home


def tamper(home: Path, *statements: str) -> None:
    """What an attacker with write access to the file does: plain SQL, no outloop involved."""
    conn = sqlite3.connect(home / "audit.db", isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()  # the last close checkpoints the WAL, so the file alone holds the change


def rewrite_consistently(db: Path, run_id: str) -> str:
    """Turn the run's first denial into an allow and rehash the whole chain, runs row included: what a writer
    who knows the (unkeyed) chain format does. The local verify passes afterwards. Returns the new head."""
    conn = sqlite3.connect(db)
    columns = ", ".join((*EVENT_COLUMNS, "hash"))
    rows = [dict(zip((*EVENT_COLUMNS, "hash"), row, strict=True))
            for row in conn.execute(f"SELECT {columns} FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]
    denied_seq = next(row["seq"] for row in rows if row["decision"] == "deny")
    head = GENESIS_HASH
    for row in rows:
        if row["seq"] == denied_seq:
            row["decision"], row["reason"], row["status"] = "allow", "allowed", None
        if row["kind"] == "run_end":
            detail = json.loads(str(row["detail"]))
            detail.update(head_hash=head, allowed=detail["allowed"] + 1, denied=detail["denied"] - 1)
            row["detail"] = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        row["prev_hash"] = head
        row["hash"] = head = event_hash(row)
        conn.execute("UPDATE events SET decision = ?, reason = ?, status = ?, detail = ?, prev_hash = ?, hash = ? "
                     "WHERE run_id = ? AND seq = ?", (row["decision"], row["reason"], row["status"], row["detail"],
                                                      row["prev_hash"], row["hash"], run_id, row["seq"]))
    conn.execute("UPDATE runs SET head_hash = ?, allowed = allowed + 1, denied = denied - 1 WHERE run_id = ?",
                 (head, run_id))
    conn.commit()
    conn.close()
    return head
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(world: World, *args: str, columns: int, lines: int = 50) -> tuple[int, str]:
    """`outloop ARGS` with stdout on a pseudo-terminal `columns` wide (what an operator's terminal shows), colour
    codes stripped; returns the exit code and the screen text."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = {key: value for key, value in world.env.items() if key != "NO_COLOR"}
    env.update(COLUMNS=str(columns), LINES=str(lines), TERM="xterm-256color")
    process = subprocess.Popen([OUTLOOP, *args], stdout=slave, stderr=subprocess.PIPE, env=env, cwd=world.work)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    code = process.wait(timeout=30)
    assert process.stderr is not None
    process.stderr.close()
    return code, ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")
