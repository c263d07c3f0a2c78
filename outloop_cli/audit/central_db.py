"""The central PostgreSQL: connecting with a bounded wait, and creating or migrating its schema.

The central copy is append-only by design: one `events` table keyed by (host_id, run_id, seq), holding each
event exactly as the host's chain hashed it. Runs are read from their run_start and run_end events, so shipping
needs INSERT (and SELECT) only, and a role without UPDATE or DELETE cannot rewrite what a host already shipped.
psycopg is imported here, lazily by the callers, so nothing on a run's start-up path pays for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

import psycopg
from psycopg import conninfo

from outloop_cli.audit.central_config import CentralConfig
from outloop_cli.audit.chain import EVENT_COLUMNS
from outloop_cli.errors import EXIT_UNAVAILABLE, OutloopError, UsageError

if TYPE_CHECKING:
    from outloop_cli.secrets import Secret

SCHEMA: Final = "outloop"
EVENTS: Final = f"{SCHEMA}.events"
# Every column the chain hashes, plus the hash: the SELECT list for walking a shipped chain.
CHAIN_COLUMNS: Final = (*EVENT_COLUMNS, "hash")

_EVENTS_V1: Final = (
    f"""CREATE TABLE {EVENTS} (
        host_id text NOT NULL,
        run_id text NOT NULL,
        seq bigint NOT NULL,
        ts double precision NOT NULL,
        kind text NOT NULL,
        workspace text NOT NULL,
        credential text,
        method text,
        host text,
        path text,
        decision text,
        reason text,
        rule text,
        status bigint,
        latency_ms double precision,
        bytes_in bigint,
        bytes_out bigint,
        request_seq bigint,
        error text,
        detail text,
        prev_hash text NOT NULL,
        hash text NOT NULL,
        shipped_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (host_id, run_id, seq)
    )""",
    # The operator's filters, each ending in ts so "newest first since T" walks an index backwards to its limit.
    f"CREATE INDEX events_by_workspace ON {EVENTS} (workspace, ts)",
    f"CREATE INDEX events_by_workspace_decision ON {EVENTS} (workspace, decision, ts)",
    f"CREATE INDEX events_by_decision ON {EVENTS} (decision, ts)",
    f"CREATE INDEX events_by_credential ON {EVENTS} (credential, ts)",
    f"CREATE INDEX events_by_ts ON {EVENTS} (ts)",
    # A run by id whatever host it came from (the key starts with host_id), and the runs listing.
    f"CREATE INDEX events_by_run ON {EVENTS} (run_id, seq)",
    f"CREATE INDEX run_starts ON {EVENTS} (ts, run_id) WHERE kind = 'run_start'",
    f"CREATE INDEX run_ends ON {EVENTS} (host_id, run_id) WHERE kind = 'run_end'",
    # Each request joined to the response event that recorded its outcome, as the listings show them.
    f"CREATE INDEX events_by_request ON {EVENTS} (host_id, run_id, request_seq) WHERE request_seq IS NOT NULL",
)

# Applied in order from outloop.schema_version; append, never edit, once released.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_EVENTS_V1,)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class CentralError(OutloopError):
    """The central database cannot be reached or used; the local audit is unaffected."""

    exit_code = EXIT_UNAVAILABLE


def describe(config: CentralConfig) -> str:
    """Where the central copy lives, safe to print: no password, even one written into the DSN."""
    try:
        parts = conninfo.conninfo_to_dict(config.dsn)
    except psycopg.ProgrammingError:
        return "(an unparsable dsn)"
    where = f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"
    return f"{parts['user']}@{where}" if parts.get("user") else where


def connect(config: CentralConfig, environ: Mapping[str, str], *, timeout: float | None = None) -> psycopg.Connection:
    """A connection that gives up after ``timeout`` seconds (connecting, then per statement).

    Errors carry libpq's message with the password scrubbed out, whichever way it was given.
    """
    limit = config.timeout if timeout is None else timeout
    secret: Secret | None = config.password(environ)
    try:
        params = conninfo.conninfo_to_dict(config.dsn)
    except psycopg.ProgrammingError:
        raise UsageError(f"{config.source}: audit.central.dsn is not a valid PostgreSQL connection string") from None
    scrub = _scrubber(secret, params.get("password"))
    options = f"-c statement_timeout={int(limit * 1000)}" if timeout is not None else ""
    try:
        return psycopg.connect(
            config.dsn,
            password=secret.reveal() if secret is not None else params.get("password"),
            connect_timeout=max(2, math.ceil(limit)),
            application_name=f"outloop {config.host_id}"[:63],
            options=options,
            autocommit=True,
        )
    except psycopg.Error as exc:
        raise CentralError(f"cannot connect to the central audit database {describe(config)}: "
                           f"{scrub(first_line(exc))}") from None
    finally:
        if secret is not None:
            secret.wipe()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _scrubber(secret: Secret | None, inline: object) -> Callable[[str], str]:
    values = [v for v in (secret.reveal() if secret is not None else None, inline) if isinstance(v, str) and v]

    def scrub(message: str) -> str:
        for value in values:
            message = message.replace(value, "<redacted>")
        return message

    return scrub


def schema_version(conn: psycopg.Connection) -> int:
    """0 for a database never initialised; the version otherwise."""
    row = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.schema_version",)).fetchone()
    if row is None or row[0] is None:
        return 0
    found = conn.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
    return int(found[0]) if found and found[0] is not None else 0


def require_schema(conn: psycopg.Connection, config: CentralConfig) -> None:
    version = schema_version(conn)
    if version < SCHEMA_VERSION:
        raise CentralError(f"the central audit database {describe(config)} has schema {version}, this outloop "
                           f"needs {SCHEMA_VERSION}: run `outloop audit central init`")
    if version > SCHEMA_VERSION:
        raise CentralError(f"the central audit database {describe(config)} has schema {version}, newer than this "
                           f"outloop knows ({SCHEMA_VERSION}): upgrade outloop on this host")


def init_schema(conn: psycopg.Connection, config: CentralConfig) -> tuple[int, int]:
    """Create or migrate the central schema in one transaction; returns (version before, version after).

    An advisory lock makes concurrent inits from several hosts wait for each other instead of racing.
    """
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('outloop central schema'))")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL, "
                         "applied_at timestamptz NOT NULL DEFAULT now())")
            before = schema_version(conn)
            if before > SCHEMA_VERSION:
                raise CentralError(f"the central audit database {describe(config)} has schema {before}, newer "
                                   f"than this outloop knows ({SCHEMA_VERSION}): upgrade outloop")
            for version, statements in enumerate(MIGRATIONS[before:], start=before + 1):
                for statement in statements:
                    conn.execute(statement)  # our own constant DDL, never user text
                conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (version,))
    except psycopg.Error as exc:
        raise CentralError(f"cannot create the central schema in {describe(config)}: {first_line(exc)}") from None
    return before, SCHEMA_VERSION
