"""audit.db's schema, its migrations, and opening it: writable for runs, read-only for operator commands.

Everything that knows the database's layout lives here; an older file is upgraded in place on first use.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from outloop_cli.audit.chain import error_sql
from outloop_cli.audit.shipped import SHIPPED_SCHEMA
from outloop_cli.errors import AuditError
from outloop_cli.private_fs import check_private_file

# Long enough to ride out another run's group commit or a checkpoint, short enough that a wedged
# database turns into refused requests (fail closed) rather than a hung agent loop.
DEFAULT_BUSY_TIMEOUT: Final = 5.0
# SQLite opens these by name beside the database, so they get the database's checks.
SQLITE_COMPANIONS: Final = ("-wal", "-shm")

_SCHEMA_V1: Final = (
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY NOT NULL,
        workspace TEXT NOT NULL,
        command TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        exit_code INTEGER,
        duration REAL,
        allowed INTEGER NOT NULL DEFAULT 0,
        denied INTEGER NOT NULL DEFAULT 0,
        sandbox TEXT,
        head_hash TEXT,
        event_count INTEGER
    )""",
    "CREATE INDEX runs_by_start ON runs (started_at, run_id)",
    "CREATE INDEX runs_by_workspace ON runs (workspace, started_at, run_id)",
    """CREATE TABLE events (
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        workspace TEXT NOT NULL,
        credential TEXT,
        method TEXT,
        host TEXT,
        path TEXT,
        decision TEXT,
        reason TEXT,
        rule TEXT,
        status INTEGER,
        latency_ms REAL,
        bytes_in INTEGER,
        bytes_out INTEGER,
        request_seq INTEGER,
        error TEXT,
        detail TEXT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    )""",
    # One index per filter the operator commands offer, each ending in ts so "newest first, since T"
    # walks the index backwards and stops at the limit instead of sorting.
    "CREATE INDEX events_by_ts ON events (ts)",
    "CREATE INDEX events_by_workspace ON events (workspace, ts)",
    "CREATE INDEX events_by_workspace_decision ON events (workspace, decision, ts)",
    "CREATE INDEX events_by_credential ON events (credential, ts)",
    "CREATE INDEX events_by_decision ON events (decision, ts)",
    """CREATE TABLE pruned (
        run_id TEXT PRIMARY KEY NOT NULL,
        workspace TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        event_count INTEGER,
        head_hash TEXT,
        pruned_at REAL NOT NULL
    )""",
)


def _migrate_to_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _migrate_to_v2(conn: sqlite3.Connection) -> None:
    """Join each outcome to its decision, and count failed outcomes per run.

    Response events always carried their request's seq; the index makes "request with its outcome" a lookup,
    so listings can show status, latency and bytes on the request's row. Stored events are not rewritten (the
    chain covers them); only the unhashed runs row gains a backfilled ``errors`` count.
    """
    conn.execute("CREATE INDEX events_by_request ON events (run_id, request_seq) WHERE request_seq IS NOT NULL")
    conn.execute("CREATE INDEX events_by_status ON events (status, ts) WHERE status IS NOT NULL")
    conn.execute(
        f"CREATE INDEX events_failed ON events (run_id, request_seq) WHERE kind = 'response' AND {error_sql()}"
    )
    conn.execute("ALTER TABLE runs ADD COLUMN errors INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "UPDATE runs SET errors = (SELECT count(*) FROM events WHERE events.run_id = runs.run_id "
        f"AND kind = 'response' AND {error_sql()})"
    )


def _migrate_to_v3(conn: sqlite3.Connection) -> None:
    """Runs of one `run --each` share a batch id; every run names the hash of the policy it ran under.

    Both are also in the run_start event's detail, so the chain covers them; these columns are for lookups.
    """
    conn.execute("ALTER TABLE runs ADD COLUMN batch_id TEXT")
    conn.execute("ALTER TABLE runs ADD COLUMN policy_hash TEXT")
    conn.execute("CREATE INDEX runs_by_batch ON runs (batch_id, started_at) WHERE batch_id IS NOT NULL")


def _migrate_to_shipped(conn: sqlite3.Connection) -> None:
    for statement in SHIPPED_SCHEMA:
        conn.execute(statement)


def status_index_sql(table: str = "") -> str:
    """The condition of events_unusual_status; a query can use that index only if its WHERE carries this verbatim."""
    return f"{table}status != 200"


def _migrate_to_lean_indexes(conn: sqlite3.Connection) -> None:
    """Fewer index pages per commit: every brokered request pays for each index its events enter.

    Denials and statuses other than 200 are the exception, so only they enter partial indexes (an allowed request is
    found by walking ``events_by_ts`` or ``events_by_workspace``, which stops at the limit at once); the credential
    filter only ever asks for requests, so outcomes stay out of its index. An allowed request and its outcome now
    enter 6 secondary indexes instead of 12. The numbers are in docs/CHOICES.md.
    """
    for name in ("events_by_workspace_decision", "events_by_decision", "events_by_credential", "events_by_status"):
        conn.execute(f"DROP INDEX {name}")
    conn.execute("CREATE INDEX events_denied ON events (ts) WHERE decision = 'deny'")
    conn.execute("CREATE INDEX events_denied_by_workspace ON events (workspace, ts) WHERE decision = 'deny'")
    conn.execute("CREATE INDEX events_requests_by_credential ON events (credential, ts) WHERE kind = 'request'")
    conn.execute(f"CREATE INDEX events_unusual_status ON events (status, ts) WHERE {status_index_sql()}")


# Applied in order from the database's user_version; append, never edit, once released.
MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _migrate_to_v1, _migrate_to_v2, _migrate_to_v3, _migrate_to_shipped, _migrate_to_lean_indexes,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


# How long one try for a lock waits inside SQLite; retry_while_busy keeps the overall deadline.
LOCK_POLL_MS: Final = 2


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether another connection held the lock (for longer than the busy timeout allowed to wait)."""
    return str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_BUSY")


def describe_error(exc: sqlite3.Error, busy_timeout: float) -> str:
    # SQLite's messages name files, tables and columns, never bound values, so they are safe to show.
    if is_busy(exc):
        return f"database is locked by another process for longer than the {busy_timeout:g} s busy timeout"
    return str(exc)


def _newer_schema(version: int) -> AuditError:
    return AuditError(
        f"audit.db was written by a newer outloop (schema {version}, this one knows {SCHEMA_VERSION}); upgrade outloop"
    )


def _user_version(conn: sqlite3.Connection) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert isinstance(version, int)
    return version


def _migrate(conn: sqlite3.Connection) -> None:
    if _user_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(conn)  # another process may have migrated while we waited for the lock
        if version > SCHEMA_VERSION:
            raise _newer_schema(version)
        for migration in MIGRATIONS[version:]:
            migration(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def open_rw(db_path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A writable, migrated connection; creates the database (0600, in a 0700 directory) when missing."""
    check_private_file(db_path, create=True, companions=SQLITE_COMPANIONS)
    try:
        conn = sqlite3.connect(db_path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit database at {db_path}: {describe_error(exc, busy_timeout)}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {LOCK_POLL_MS}")
        retry_while_busy(conn, busy_timeout, lambda: _prepare(conn, db_path))
        conn.execute(f"PRAGMA busy_timeout = {round(busy_timeout * 1000)}")  # as connect() set it
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot open the audit database at {db_path}: {describe_error(exc, busy_timeout)}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, db_path: Path) -> None:
    """Each step is safe to repeat, so a step that found the lock taken can start over."""
    # Refuse a newer schema before anything below writes to the file.
    version = _user_version(conn)
    if version > SCHEMA_VERSION:
        raise _newer_schema(version)
    # WAL lets many runs append while operators read. synchronous=NORMAL still survives a killed
    # process (the threat: a loop or its broker dying mid-run), because a commit is in the WAL file
    # before COMMIT returns; only an OS crash or power cut can lose the last commits, and the price of
    # guarding against that (FULL: an fsync per commit) would be paid on every brokered request.
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise AuditError(f"cannot switch the audit database at {db_path} to WAL mode (it is in {mode})")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # RunLog checkpoints on its own thread instead
    _migrate(conn)


def retry_while_busy(conn: sqlite3.Connection, busy_timeout: float, action: Callable[[], object]) -> None:
    """Run ``action``, trying again while another connection holds the lock, until ``busy_timeout`` seconds
    have passed. ``conn`` must wait only LOCK_POLL_MS per try (`PRAGMA busy_timeout`).

    SQLite's busy handler backs off to one try every 100 ms. Runs that commit often (every brokered request)
    take the lock back within milliseconds, so a waiter on that handler kept missing the moments it was free:
    writers waited seconds, and a run opening the database next to five busy ones hit the busy timeout.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise


def open_readonly(
    db_path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, missing_ok: bool = False
) -> sqlite3.Connection:
    """A connection for operator commands, which must never change what they report on.

    An older schema is migrated first (through a separate writable connection), so reads after an upgrade
    see the columns this code expects. With ``missing_ok``, a database not created yet (no run so far) reads
    as an empty one: a listing on a new machine is empty, not an error; nothing is created on disk.
    """
    if not check_private_file(db_path, companions=SQLITE_COMPANIONS):
        if not missing_ok:
            raise AuditError(f"no audit database at {db_path} yet: run `outloop run` first")
        empty = sqlite3.connect(":memory:", isolation_level=None)
        _migrate(empty)
        return empty
    try:
        conn = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit database at {db_path}: {describe_error(exc, busy_timeout)}") from None
    try:
        version = _user_version(conn)
        if version > SCHEMA_VERSION:
            raise _newer_schema(version)
        if version < SCHEMA_VERSION:
            open_rw(db_path, busy_timeout).close()
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot open the audit database at {db_path}: {describe_error(exc, busy_timeout)}") from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Hold one read transaction, so a live run's commit cannot land between two related reads."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
