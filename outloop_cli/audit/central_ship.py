"""Copy this host's audit events to the central PostgreSQL, exactly and at most once per (host_id, run_id, seq).

Each batch is one central transaction (COPY into a staging table, then INSERT ... ON CONFLICT DO NOTHING), and
only after it commits do the local markers move. A shipper killed anywhere therefore leaves the central copy
with whole batches and the markers at or behind it; the next ship resends from the markers and the key drops
what already arrived. No gap, no duplicate.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg

from outloop_cli.audit.central_config import CentralConfig
from outloop_cli.audit.central_db import (
    CHAIN_COLUMNS,
    EVENTS,
    CentralError,
    connect,
    describe,
    first_line,
    require_schema,
)
from outloop_cli.audit.schema import DEFAULT_BUSY_TIMEOUT, open_readonly
from outloop_cli.audit.shipped import Backlog, Pending, backlog, mark, pending_runs

DEFAULT_BATCH: Final = 5000
_COLUMNS: Final = ("host_id", *CHAIN_COLUMNS)
_STAGING: Final = "outloop_staging"


@dataclass(frozen=True)
class ShipResult:
    """What one ship did: ``sent`` events in ``batches`` transactions; ``backlog`` is what is still waiting."""

    target: str
    host_id: str
    sent: int
    runs: int
    batches: int
    backlog: Backlog


def local_backlog(db_path: Path) -> Backlog:
    conn = open_readonly(db_path)
    try:
        return backlog(conn)
    finally:
        conn.close()


def ship(
    db_path: Path,
    config: CentralConfig,
    environ: Mapping[str, str],
    *,
    run_id: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    timeout: float | None = None,
) -> ShipResult:
    """Ship every unshipped event (or only ``run_id``'s); raises CentralError, with the backlog untouched, when
    the server cannot be reached or refuses."""
    reader = open_readonly(db_path)  # migrates an older audit.db first, so the shipped table exists
    writer = sqlite3.connect(db_path, timeout=DEFAULT_BUSY_TIMEOUT, isolation_level=None)
    try:
        work = pending_runs(reader, run_id)
        central = connect(config, environ, timeout=timeout)
        try:
            require_schema(central, config)
            _stage(central)
            sent = batches = 0
            for rows, reached in _batches(reader, work, batch_size):
                _send(central, config, rows)
                mark(writer, reached)
                sent += len(rows)
                batches += 1
        except psycopg.Error as exc:
            raise CentralError(f"shipping to {describe(config)} failed: {first_line(exc)}") from None
        finally:
            central.close()
        return ShipResult(describe(config), config.host_id, sent, len(work), batches, backlog(reader))
    finally:
        writer.close()
        reader.close()


def _stage(central: psycopg.Connection) -> None:
    central.execute(f"CREATE TEMP TABLE {_STAGING} (LIKE {EVENTS} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")


def _batches(
    reader: sqlite3.Connection, work: list[Pending], batch_size: int
) -> Iterator[tuple[list[tuple[object, ...]], dict[str, int]]]:
    """Rows of up to ``batch_size`` events across runs, each with the marker every run reaches once it commits."""
    rows: list[tuple[object, ...]] = []
    reached: dict[str, int] = {}
    select = f"SELECT {', '.join(CHAIN_COLUMNS)} FROM events WHERE run_id = ? AND seq >= ? AND seq < ? ORDER BY seq"
    for item in work:
        # Bounded by the run's recorded count: a live run's later events wait for the next ship.
        for row in reader.execute(select, (item.run_id, item.from_seq, item.count)):
            rows.append(row)
            reached[item.run_id] = int(row[1]) + 1
            if len(rows) >= batch_size:
                yield rows, reached
                rows, reached = [], {}
    if rows:
        yield rows, reached


def _send(central: psycopg.Connection, config: CentralConfig, rows: list[tuple[object, ...]]) -> None:
    columns = ", ".join(_COLUMNS)
    with central.transaction():
        with central.cursor() as cursor, cursor.copy(f"COPY {_STAGING} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((config.host_id, *row))
        inserted = central.execute(
            f"INSERT INTO {EVENTS} ({columns}) SELECT {columns} FROM {_STAGING} "
            "ON CONFLICT (host_id, run_id, seq) DO NOTHING"
        ).rowcount
        if inserted != len(rows):
            _check_repeats(central, config)


def _check_repeats(central: psycopg.Connection, config: CentralConfig) -> None:
    """Events already central (a resend after a crash) must be the same events, or this host rewrote history."""
    clash = central.execute(
        f"SELECT s.run_id, s.seq FROM {_STAGING} s JOIN {EVENTS} e USING (host_id, run_id, seq) "
        "WHERE e.hash <> s.hash ORDER BY s.run_id, s.seq LIMIT 1"
    ).fetchone()
    if clash is not None:
        raise CentralError(
            f"the central copy already holds a different event {clash[1]} of run {clash[0]} from host "
            f"{config.host_id!r}: the local audit was rewritten after shipping, or two hosts share a host_id; "
            "`outloop audit verify --against-central` compares them"
        )
