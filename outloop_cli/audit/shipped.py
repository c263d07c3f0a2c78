"""This host's record of what has reached the central PostgreSQL: one marker per run, in audit.db itself.

A marker only moves after the central commit, so a shipper killed at any point leaves it behind the truth,
never ahead: the next `audit ship` sends those events again and the central key (host_id, run_id, seq) drops
the repeats. Nothing here talks to the network, so `doctor` can show the backlog without psycopg.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# Appended to the audit.db migrations by store.py; `seq` is how many events of the run (seq 0..seq-1) are shipped.
SHIPPED_SCHEMA: Final = (
    """CREATE TABLE shipped (
        run_id TEXT PRIMARY KEY NOT NULL,
        seq INTEGER NOT NULL,
        shipped_at REAL NOT NULL
    )""",
)


@dataclass(frozen=True)
class Pending:
    """A run with events not yet shipped: ``from_seq`` is the first one to send, ``count`` the run's total."""

    run_id: str
    from_seq: int
    count: int


@dataclass(frozen=True)
class Backlog:
    runs: int
    events: int


def pending_runs(conn: sqlite3.Connection, run_id: str | None = None) -> list[Pending]:
    """Runs holding events the central copy lacks, oldest first; a live run ships what it has committed so far."""
    where, params = ("AND r.run_id = ?", [run_id]) if run_id is not None else ("", [])
    rows = conn.execute(
        "SELECT r.run_id, COALESCE(s.seq, 0), r.event_count FROM runs r LEFT JOIN shipped s USING (run_id) "
        f"WHERE r.event_count > COALESCE(s.seq, 0) {where} ORDER BY r.started_at, r.run_id",
        params,
    ).fetchall()
    return [Pending(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def backlog(conn: sqlite3.Connection) -> Backlog:
    row = conn.execute(
        "SELECT count(*), COALESCE(sum(r.event_count - COALESCE(s.seq, 0)), 0) FROM runs r "
        "LEFT JOIN shipped s USING (run_id) WHERE r.event_count > COALESCE(s.seq, 0)"
    ).fetchone()
    return Backlog(int(row[0]), int(row[1]))


def backlog_readonly(db_path: Path) -> Backlog | None:
    """The backlog without migrating or writing (for doctor): before the shipped table exists, everything waits.

    None when there is no readable audit database yet.
    """
    if not db_path.is_file():
        return None
    try:
        conn = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        tables = {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" not in tables:
            return Backlog(0, 0)
        if "shipped" in tables:
            return backlog(conn)
        row = conn.execute("SELECT count(*), COALESCE(sum(event_count), 0) FROM runs WHERE event_count > 0").fetchone()
        return Backlog(int(row[0]), int(row[1]))
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def shipped_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """run_id -> events shipped, for comparing this host with the central copy."""
    return {str(run_id): int(seq) for run_id, seq in conn.execute("SELECT run_id, seq FROM shipped")}


def mark(conn: sqlite3.Connection, shipped: Mapping[str, int]) -> None:
    """Record that the central copy now holds each run's events below the given seq (one transaction)."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO shipped (run_id, seq, shipped_at) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO UPDATE SET seq = max(seq, excluded.seq), shipped_at = excluded.shipped_at",
            [(run_id, seq, now) for run_id, seq in shipped.items()],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
