"""Inspect audit.db for `outloop doctor` without changing its content: owner, schema version, integrity, WAL.

Opened read-only and never migrated, so a doctor run on a machine with a newer or broken database is harmless.
Like every command, it tightens a too-open mode on the operator's own file and refuses anyone else's.
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path

from outloop_cli.audit.schema import SCHEMA_VERSION, SQLITE_COMPANIONS
from outloop_cli.errors import StateDirError
from outloop_cli.private_fs import check_private_file


@dataclass
class DatabaseHealth:
    """What doctor reports about audit.db; `problems` are (what, fix) pairs that stop runs."""

    path: Path
    exists: bool
    size_bytes: int = 0
    mode: str | None = None
    schema_version: int | None = None
    known_schema_version: int = SCHEMA_VERSION
    journal_mode: str | None = None
    quick_check: str | None = None
    runs: int | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def inspect_database(path: Path) -> DatabaseHealth:
    try:
        exists = check_private_file(path, companions=SQLITE_COMPANIONS)
    except StateDirError as exc:  # another user's file, or a link: reported, never opened
        return DatabaseHealth(path, True, problems=[(exc.message, "see docs/OPERATIONS.md, State directories")])
    if not exists:
        return DatabaseHealth(path, False, notes=["not created yet; the first `outloop run` creates it"])
    info = path.stat()
    health = DatabaseHealth(path, True, size_bytes=info.st_size, mode=f"{stat.S_IMODE(info.st_mode):04o}")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        health.problems.append((f"cannot open {path}: {exc}", "check the file's owner and permissions"))
        return health
    try:
        _inspect(conn, health)
    except sqlite3.Error as exc:
        health.problems.append((f"{path} cannot be read: {exc}",
                                "move it aside (outloop starts a new one) and keep the old file as evidence"))
    finally:
        conn.close()
    return health


def _inspect(conn: sqlite3.Connection, health: DatabaseHealth) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    health.schema_version = version
    if version > SCHEMA_VERSION:
        health.problems.append((f"schema {version} was written by a newer outloop (this one knows {SCHEMA_VERSION})",
                                "upgrade outloop"))
        return
    if version < SCHEMA_VERSION:
        health.notes.append(f"schema {version} will be migrated to {SCHEMA_VERSION} by the next run")
    health.journal_mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if health.journal_mode != "wal":
        health.problems.append((f"journal mode is {health.journal_mode}, not wal",
                                "the next `outloop run` switches it; if it stays, the file system may not "
                                "support WAL (network file systems do not): move OUTLOOP_HOME to a local disk"))
    result = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
    health.quick_check = "; ".join(result)
    if result != ["ok"]:
        health.problems.append((f"quick_check found damage: {health.quick_check}",
                                "copy the file aside, then `sqlite3 audit.db .recover` into a new database"))
    if version >= 1:
        health.runs = int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])
