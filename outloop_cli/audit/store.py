"""The audit database: its schema and migrations, the per-run writer, and the operator's read side.

Everything that knows audit.db's layout or how an event is hashed lives here, so there is one chain format.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    import asyncio  # imported lazily at run time: `outloop audit` and `--help` never need an event loop

from outloop_cli.audit.shipped import SHIPPED_SCHEMA
from outloop_cli.errors import AuditError

GENESIS_HASH: Final = "0" * 64
# Long enough to ride out another run's group commit or a checkpoint, short enough that a wedged
# database turns into refused requests (fail closed) rather than a hung agent loop.
DEFAULT_BUSY_TIMEOUT: Final = 5.0
# Caps one group commit so a burst cannot hold the write lock (and every other run) for long.
_MAX_BATCH: Final = 512

# Every stored event column except ``hash``, which covers them all. The order is the SELECT order.
EVENT_COLUMNS: Final = (
    "run_id", "seq", "ts", "kind", "workspace", "credential", "method", "host", "path", "decision",
    "reason", "rule", "status", "latency_ms", "bytes_in", "bytes_out", "request_seq", "error", "detail",
    "prev_hash",
)  # fmt: skip
_TEXT_COLUMNS: Final = frozenset({"credential", "method", "host", "path", "decision", "reason", "rule", "error"})
_INT_COLUMNS: Final = frozenset({"status", "bytes_in", "bytes_out", "request_seq"})
_REAL_COLUMNS: Final = frozenset({"latency_ms"})
# Kinds with their own method: they feed the counters and the run_end cross-check, so never generic.
_RESERVED_KINDS: Final = frozenset({"run_start", "run_end", "request", "response"})
_COLUMN_KEYWORDS: Final = _TEXT_COLUMNS | _INT_COLUMNS | _REAL_COLUMNS
_RUN_COLUMNS: Final = (
    "run_id", "workspace", "command", "started_at", "ended_at", "exit_code", "duration", "allowed",
    "denied", "sandbox", "head_hash", "event_count",
)  # fmt: skip

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


def _migrate_to_shipped(conn: sqlite3.Connection) -> None:
    for statement in SHIPPED_SCHEMA:
        conn.execute(statement)


# Applied in order from the database's user_version; append, never edit, once released.
MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (_migrate_to_v1, _migrate_to_shipped)
SCHEMA_VERSION: Final = len(MIGRATIONS)


# --------------------------------------------------------------------------------------------------
# The chain format


def canonical_json(value: object) -> str:
    """One spelling per value, so a hash recomputed from what SQLite hands back matches the original."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def event_hash(fields: Mapping[str, object]) -> str:
    """Hash of one event; NULL columns are left out so a migration adding a column keeps old chains valid.

    Raises TypeError or ValueError for values no writer could have stored (a tampered BLOB, infinity).
    """
    body = {name: value for name, value in fields.items() if name != "hash" and value is not None}
    return hashlib.sha256((str(fields["prev_hash"]) + canonical_json(body)).encode()).hexdigest()


def _now() -> float:
    # Microseconds are plenty for ordering, and keep the hashed float repr short.
    return round(time.time(), 6)


def _text(value: str) -> str:
    # A lone surrogate (from a surrogateescape-decoded path) cannot be stored as UTF-8 TEXT; escape it
    # rather than refuse the request over its audit spelling.
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _path_without_query_values(path: str) -> str:
    # The broker should never hand us a query string, but query values may be secrets: keep names only.
    base, _, query = path.partition("#")[0].partition("?")
    if not query:
        return base
    return base + "?" + "&".join(part.partition("=")[0] for part in query.split("&") if part)


def _json_object(value: Mapping[str, object], what: str) -> dict[str, object]:
    """A plain-JSON copy of a caller's detail, so a bad value fails in the caller, not the writer."""
    try:
        loaded = json.loads(canonical_json(dict(value)))
    except (TypeError, ValueError) as exc:
        raise AuditError(f"{what} is not JSON-serialisable ({type(exc).__name__})") from None
    assert isinstance(loaded, dict)
    return loaded


def _check_decision(decision: object) -> None:
    if decision not in ("allow", "deny"):
        raise ValueError("decision must be 'allow' or 'deny'")


def _column_value(name: str, value: object) -> object:
    """The Python value SQLite will hand back for this column, so writer and verifier hash the same thing."""
    if value is None:
        return None
    if name in _TEXT_COLUMNS:
        if not isinstance(value, str):
            raise TypeError(f"audit field {name} must be a string")
        return _path_without_query_values(_text(value)) if name == "path" else _text(value)
    if name in _INT_COLUMNS:
        if not isinstance(value, int):
            raise TypeError(f"audit field {name} must be an integer")
        return int(value)  # a bool would come back from SQLite as 0/1
    if name in _REAL_COLUMNS:
        if not isinstance(value, int | float):
            raise TypeError(f"audit field {name} must be a number")
        number = float(value) + 0.0  # -0.0 + 0.0 is 0.0: SQLite hands -0.0 back as 0.0
        return number if math.isfinite(number) else None  # SQLite would turn NaN into NULL anyway
    raise TypeError(f"unknown audit field {name}")


# --------------------------------------------------------------------------------------------------
# Opening and migrating


def _describe(exc: sqlite3.Error, busy_timeout: float) -> str:
    # SQLite's messages name files, tables and columns, never bound values, so they are safe to show.
    if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
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


def _open_rw(db_path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A writable, migrated connection; creates the database (0600, in a 0700 directory) when missing."""
    try:
        db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise AuditError(f"cannot create the audit database at {db_path}: {exc.strerror}") from None
    try:
        conn = sqlite3.connect(db_path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit database at {db_path}: {_describe(exc, busy_timeout)}") from None
    try:
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
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot open the audit database at {db_path}: {_describe(exc, busy_timeout)}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def open_readonly(db_path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> sqlite3.Connection:
    """A connection for operator commands, which must never change what they report on.

    An older schema is migrated first (through a separate writable connection), so reads after an upgrade
    see the columns this code expects.
    """
    if not db_path.is_file():
        raise AuditError(f"no audit database at {db_path} yet: run `outloop run` first")
    try:
        conn = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit database at {db_path}: {_describe(exc, busy_timeout)}") from None
    try:
        version = _user_version(conn)
        if version > SCHEMA_VERSION:
            raise _newer_schema(version)
        if version < SCHEMA_VERSION:
            _open_rw(db_path, busy_timeout).close()
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot open the audit database at {db_path}: {_describe(exc, busy_timeout)}") from None
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


# --------------------------------------------------------------------------------------------------
# Writing one run


@dataclass(frozen=True)
class RequestRecord:
    """What the broker knows when it decides; committed before the request may go upstream."""

    credential: str | None
    method: str
    host: str | None
    path: str
    decision: str  # "allow" | "deny"
    reason: str
    rule: str | None
    status: int | None = None  # the broker's own status code, for denials


@dataclass(frozen=True)
class ResponseRecord:
    """How an allowed request ended; ``error`` is a code such as ``upstream_timeout``, never a message."""

    request_seq: int
    status: int
    latency_ms: float
    bytes_in: int
    bytes_out: int
    error: str | None = None


_CHECKPOINT_SECONDS = 1.0
_Outcome = int | AuditError
# Who waits for an event's commit: a thread, an asyncio task, or nobody (fire-and-forget).
_Waiter: TypeAlias = "concurrent.futures.Future[int] | asyncio.Future[int] | None"


@dataclass(frozen=True)
class _End:
    exit_code: int
    duration: float
    detail: dict[str, object]


@dataclass(frozen=True)
class _Item:
    kind: str
    ts: float
    fields: dict[str, object]
    waiter: _Waiter
    end: _End | None = None


def _settle(future: asyncio.Future[int] | concurrent.futures.Future[int], outcome: _Outcome) -> None:
    if future.done():  # the awaiting task was cancelled; the event is committed regardless
        return
    if isinstance(outcome, AuditError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle_all(outcomes: list[tuple[asyncio.Future[int], _Outcome]]) -> None:
    for future, outcome in outcomes:
        _settle(future, outcome)


def _notify(outcomes: list[tuple[_Waiter, _Outcome]]) -> None:
    """Wake each waiting event loop once per batch: a wakeup per event cost more than the commit."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], _Outcome]]] = {}
    for waiter, outcome in outcomes:
        if isinstance(waiter, concurrent.futures.Future):
            _settle(waiter, outcome)
        elif waiter is not None:
            by_loop.setdefault(waiter.get_loop(), []).append((waiter, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle_all, settled)


_INSERT_EVENT: Final = (
    f"INSERT INTO events ({', '.join((*EVENT_COLUMNS, 'hash'))}) "
    f"VALUES ({', '.join(':' + name for name in (*EVENT_COLUMNS, 'hash'))})"
)


class RunLog:
    """Writer for ONE run, used by the broker process; thread-safe and usable from asyncio.

    All writes go through one writer thread that commits whatever is queued as one transaction (group
    commit): concurrent requests share a commit instead of queueing for the write lock one by one, and
    seq numbers and the chain are assigned in exactly one place, so they cannot race.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        db_path: Path,
        run_id: str,
        workspace: str,
        command: list[str],
        sandbox: object,
        busy_timeout: float,
    ) -> None:
        self.db_path = db_path
        self.run_id = run_id
        self.workspace = workspace
        self._conn = conn
        self._command = canonical_json(command)
        self._sandbox = None if sandbox is None else canonical_json(sandbox)
        self._busy_timeout = busy_timeout
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        # Owned by the writer thread once it runs.
        self._seq = 0
        self._head = GENESIS_HASH
        self._allowed = 0
        self._denied = 0
        self._lost = 0  # fire-and-forget events whose batch failed; reported in run_end
        # seq -> (credential, method, host, path) of allowed requests still awaiting their response.
        self._open_requests: dict[object, tuple[object, object, object, object]] = {}
        self._thread = threading.Thread(target=self._loop, name=f"outloop-audit-{run_id}", daemon=True)
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name=f"outloop-ckpt-{run_id}",
                                              daemon=True)

    @classmethod
    def start(
        cls,
        db_path: Path,
        *,
        run_id: str,
        workspace: str,
        command: list[str],
        detail: Mapping[str, object],
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> RunLog:
        """Open the database and commit the run's row and run_start event (seq 0) before returning.

        ``detail`` is stored on run_start (its ``sandbox`` entry also on the runs row); the command is
        added to it so the runs row can be checked against the chain.
        """
        start_detail = {**_json_object(detail, "run detail"), "command": list(command)}
        conn = _open_rw(db_path, busy_timeout)
        log = cls(
            conn,
            db_path=db_path,
            run_id=run_id,
            workspace=workspace,
            command=list(command),
            sandbox=start_detail.get("sandbox"),
            busy_timeout=busy_timeout,
        )
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        log._commit([_Item("run_start", _now(), {"detail": start_detail}, started)])
        try:
            started.result()
        except AuditError:
            conn.close()
            raise
        log._thread.start()
        log._checkpointer.start()
        return log

    @property
    def allowed(self) -> int:
        """Committed allowed requests."""
        return self._allowed

    @property
    def denied(self) -> int:
        """Committed denied requests."""
        return self._denied

    # -- public writes ----------------------------------------------------------------------------

    def record_request(self, rec: RequestRecord) -> int:
        """Commit a decision and return its seq; AuditError means it is not on disk, so refuse the request."""
        return self._wait(functools.partial(self._request_item, rec))

    async def record_request_async(self, rec: RequestRecord) -> int:
        """As record_request, without blocking the event loop."""
        return await self._wait_async(functools.partial(self._request_item, rec))

    def record_response(self, rec: ResponseRecord) -> None:
        """Queue a response event; it is committed with the next batch and nobody waits for it."""
        self._submit(self._response_item(rec, None))

    async def record_response_async(self, rec: ResponseRecord) -> int:
        """Commit a response event and return its seq, for when durability must precede the reply."""
        return await self._wait_async(functools.partial(self._response_item, rec))

    def record_event(self, kind: str, **fields: object) -> int:
        """Commit an event of another kind (``reveal``, ``limit_hit``...) and return its seq.

        Keywords naming an event column fill it; any others are folded into the JSON ``detail``.
        """
        if kind in _RESERVED_KINDS:
            raise ValueError(f"use the dedicated RunLog method for {kind} events")
        extra = fields.pop("detail", None) or {}
        if not isinstance(extra, Mapping):
            raise TypeError("audit field detail must be a mapping")
        columns = {name: fields.pop(name) for name in list(fields) if name in _COLUMN_KEYWORDS}
        if "decision" in columns:
            _check_decision(columns["decision"])
        detail = {**fields, **extra}
        values = {name: _column_value(name, value) for name, value in columns.items()}
        if detail:
            values["detail"] = _json_object(detail, f"{kind} event detail")
        return self._wait(functools.partial(_Item, _text(kind), _now(), values))

    def finish(self, *, exit_code: int, duration: float, detail: Mapping[str, object]) -> tuple[str, int]:
        """Commit run_end after everything queued, close the runs row, and stop the writer.

        run_end's detail gets exit_code, duration, allowed, denied, lost_events and the chain's head hash
        and event count before it (these win over same-named caller keys). Returns the final head hash and
        the event count including run_end, for the run summary.
        """
        end = _End(int(exit_code), float(duration), _json_object(detail, "run end detail"))
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._submit(_Item("run_end", _now(), {}, future, end), last=True)
        try:
            future.result()
        finally:
            self._thread.join()
            self._stopping.set()
            self._checkpointer.join()
        return self._head, self._seq

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database off the commit path.

        SQLite's automatic checkpoint runs inside whichever COMMIT crosses the threshold and fsyncs there: about
        one brokered request in eighty would wait milliseconds for it. The writer turns that off; this thread
        checkpoints (PASSIVE: never blocks writers or readers) every second, and once more at the end.
        """
        try:
            conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout, isolation_level=None)
        except sqlite3.Error:
            return  # the writer reports real problems; a missing checkpoint only lets the WAL grow
        try:
            while True:
                stopping = self._stopping.wait(_CHECKPOINT_SECONDS)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                if stopping:
                    return
        finally:
            conn.close()

    # -- building and queueing ----------------------------------------------------------------------

    def _request_item(self, rec: RequestRecord, waiter: _Waiter) -> _Item:
        _check_decision(rec.decision)
        fields = {
            name: _column_value(name, getattr(rec, name))
            for name in ("credential", "method", "host", "path", "decision", "reason", "rule", "status")
        }
        return _Item("request", _now(), fields, waiter)

    def _response_item(self, rec: ResponseRecord, waiter: _Waiter) -> _Item:
        fields = {
            name: _column_value(name, getattr(rec, name))
            for name in ("request_seq", "status", "latency_ms", "bytes_in", "bytes_out", "error")
        }
        return _Item("response", _now(), fields, waiter)

    def _submit(self, item: _Item, *, last: bool = False) -> None:
        # Closing under the same lock as queueing, so no other thread's event can land after run_end.
        with self._lock:
            if self._closed:
                raise AuditError(f"the audit log of run {self.run_id} is already closed")
            self._queue.put(item)
            if last:
                self._closed = True
                self._queue.put(None)

    def _wait(self, make: Callable[[_Waiter], _Item]) -> int:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._submit(make(future))
        return future.result()

    async def _wait_async(self, make: Callable[[_Waiter], _Item]) -> int:
        import asyncio

        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(make(future))
        return await future

    # -- the writer thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(batch)
                if stop:
                    return
        finally:
            self._conn.close()

    def _commit(self, batch: list[_Item]) -> None:
        """Write a batch as one transaction, then tell every waiter; on failure undo the in-memory chain."""
        saved = (self._seq, self._head, self._allowed, self._denied)
        try:
            rows = [self._chain(item) for item in batch]
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if saved[0] == 0:
                    self._conn.execute(
                        "INSERT INTO runs (run_id, workspace, command, started_at, sandbox) VALUES (?, ?, ?, ?, ?)",
                        (self.run_id, self.workspace, self._command, rows[0]["ts"], self._sandbox),
                    )
                self._conn.executemany(_INSERT_EVENT, rows)
                self._conn.execute(
                    "UPDATE runs SET allowed = ?, denied = ?, head_hash = ?, event_count = ? WHERE run_id = ?",
                    (self._allowed, self._denied, self._head, self._seq, self.run_id),
                )
                end = batch[-1].end
                if end is not None:
                    self._conn.execute(
                        "UPDATE runs SET ended_at = ?, exit_code = ?, duration = ? WHERE run_id = ?",
                        (batch[-1].ts, end.exit_code, end.duration, self.run_id),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            self._seq, self._head, self._allowed, self._denied = saved
            # Only SQLite's own message is shown: it names files and columns, never a bound value.
            if isinstance(exc, sqlite3.Error):
                reason = _describe(exc, self._busy_timeout)
            else:
                reason = f"unexpected {type(exc).__name__}"
            message = f"cannot write to the audit database at {self.db_path}: {reason}"
            self._lost += sum(1 for item in batch if item.waiter is None)
            _notify([(item.waiter, AuditError(message)) for item in batch])
            return
        for seq, item in enumerate(batch, start=saved[0]):
            if item.kind == "response":
                self._open_requests.pop(item.fields["request_seq"], None)
            elif item.kind == "request" and item.fields["decision"] == "allow":
                f = item.fields
                self._open_requests[seq] = (f["credential"], f["method"], f["host"], f["path"])
        _notify([(item.waiter, seq) for seq, item in enumerate(batch, start=saved[0])])

    def _chain(self, item: _Item) -> dict[str, object]:
        """Give an item its seq and hash, advancing the in-memory chain and counters."""
        fields = dict(item.fields)
        if item.kind == "request":
            if fields["decision"] == "allow":
                self._allowed += 1
            else:
                self._denied += 1
        elif item.kind == "response":
            # Copy what was asked from the request, so responses can be queried by credential and shown alone.
            asked = self._open_requests.get(fields["request_seq"])
            if asked is not None:
                fields["credential"], fields["method"], fields["host"], fields["path"] = asked
        if item.end is not None:
            fields["detail"] = {
                **item.end.detail,
                "exit_code": item.end.exit_code,
                "duration": item.end.duration,
                "allowed": self._allowed,
                "denied": self._denied,
                "lost_events": self._lost,
                "head_hash": self._head,
                "event_count": self._seq,
            }
        if "detail" in fields:
            fields["detail"] = canonical_json(fields["detail"])
        row: dict[str, object] = dict.fromkeys(EVENT_COLUMNS)
        row.update(fields)
        row.update(
            run_id=self.run_id,
            seq=self._seq,
            ts=item.ts,
            kind=item.kind,
            workspace=self.workspace,
            prev_hash=self._head,
        )
        row["hash"] = self._head = event_hash(row)
        self._seq += 1
        return row


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class RunRow:
    """One run as operators see it; ``incomplete`` means it never recorded an end (killed, or still live)."""

    run_id: str
    workspace: str
    command: list[str]
    started_at: float
    ended_at: float | None
    exit_code: int | None
    duration: float | None
    allowed: int
    denied: int
    sandbox: object
    head_hash: str | None
    event_count: int | None
    incomplete: bool


@dataclass(frozen=True)
class EventRow:
    """One stored event, with ``detail`` decoded."""

    run_id: str
    seq: int
    ts: float
    kind: str
    workspace: str
    credential: str | None
    method: str | None
    host: str | None
    path: str | None
    decision: str | None
    reason: str | None
    rule: str | None
    status: int | None
    latency_ms: float | None
    bytes_in: int | None
    bytes_out: int | None
    request_seq: int | None
    error: str | None
    detail: dict[str, object] | None
    prev_hash: str
    hash: str


def loads_lenient(text: object) -> object:
    # A tampered cell must not crash the commands that would show it; verify reports the tampering.
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


_RUN_SELECT: Final = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
_EVENT_SELECT: Final = f"SELECT {', '.join((*EVENT_COLUMNS, 'hash'))} FROM events"


def _run_row(row: tuple[object, ...]) -> RunRow:
    values = dict(zip(_RUN_COLUMNS, row, strict=True))
    command = loads_lenient(values["command"])
    values["command"] = command if isinstance(command, list) else [str(command)]
    values["sandbox"] = loads_lenient(values["sandbox"])
    return RunRow(**values, incomplete=values["ended_at"] is None)  # type: ignore[arg-type]


def _event_row(row: tuple[object, ...]) -> EventRow:
    values = dict(zip((*EVENT_COLUMNS, "hash"), row, strict=True))
    if values["detail"] is not None:
        detail = loads_lenient(values["detail"])
        values["detail"] = detail if isinstance(detail, dict) else {"unparsable": values["detail"]}
    return EventRow(**values)  # type: ignore[arg-type]


def list_runs(conn: sqlite3.Connection, *, limit: int = 20, workspace: str | None = None) -> list[RunRow]:
    """Newest runs first."""
    where, params = ("WHERE workspace = ?", [workspace]) if workspace is not None else ("", [])
    rows = conn.execute(
        f"{_RUN_SELECT} {where} ORDER BY started_at DESC, run_id DESC LIMIT ?", [*params, limit]
    ).fetchall()
    return [_run_row(row) for row in rows]


def get_run(conn: sqlite3.Connection, run_id: str) -> RunRow | None:
    """One run by id, or the newest for ``"last"``."""
    if run_id == "last":
        runs = list_runs(conn, limit=1)
        return runs[0] if runs else None
    row = conn.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else _run_row(row)


def run_events(
    conn: sqlite3.Connection, run_id: str, *, limit: int | None = None, after_seq: int = -1
) -> list[EventRow]:
    """A run's events in chain order; ``after_seq`` lets ``audit tail`` poll for what is new."""
    rows = conn.execute(
        f"{_EVENT_SELECT} WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (run_id, after_seq, -1 if limit is None else limit),
    ).fetchall()
    return [_event_row(row) for row in rows]


def query_events(
    conn: sqlite3.Connection,
    *,
    workspace: str | None = None,
    credential: str | None = None,
    decision: str | None = None,
    since: float | None = None,
    until: float | None = None,
    kinds: Collection[str] | None = ("request",),
    limit: int | None = 100,
) -> list[EventRow]:
    """Events across runs, newest first; request events only unless ``kinds`` says otherwise (None: all)."""
    where, params = _event_filter(workspace, credential, decision, since, until, kinds)
    rows = conn.execute(
        f"{_EVENT_SELECT} {where} ORDER BY ts DESC, rowid DESC LIMIT ?",
        [*params, -1 if limit is None else limit],
    ).fetchall()
    return [_event_row(row) for row in rows]


def iter_events(
    conn: sqlite3.Connection,
    *,
    workspace: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Iterator[EventRow]:
    """Every event of every kind, oldest first, streamed from the cursor so an export never sits in memory."""
    where, params = _event_filter(workspace, None, None, since, until, None)
    for row in conn.execute(f"{_EVENT_SELECT} {where} ORDER BY ts, rowid", params):
        yield _event_row(row)


def _event_filter(
    workspace: str | None,
    credential: str | None,
    decision: str | None,
    since: float | None,
    until: float | None,
    kinds: Collection[str] | None,
) -> tuple[str, list[object]]:
    """The WHERE clause the read helpers share; each filter has an index ending in ts (see _SCHEMA_V1)."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("workspace", workspace), ("credential", credential), ("decision", decision)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("ts < ?")
        params.append(until)
    if kinds is not None:
        kind_list = list(kinds)
        clauses.append(f"kind IN ({', '.join('?' * len(kind_list))})")
        params.extend(kind_list)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


def prune(db_path: Path, *, older_than: float, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> int:
    """Delete runs that ended before ``older_than`` (epoch seconds) with their events; return how many.

    Each leaves a ``pruned`` marker with its count and head hash, so verify can tell pruning from deletion.
    Unfinished runs are kept: they may still be live.
    """
    if not db_path.is_file():
        raise AuditError(f"no audit database at {db_path} yet: run `outloop run` first")
    conn = _open_rw(db_path, busy_timeout)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = conn.execute(
                "INSERT INTO pruned (run_id, workspace, started_at, ended_at, event_count, head_hash, "
                "pruned_at) SELECT run_id, workspace, started_at, ended_at, event_count, head_hash, ? "
                "FROM runs WHERE ended_at < ?",
                (_now(), older_than),
            ).rowcount
            conn.execute(
                "DELETE FROM events WHERE run_id IN (SELECT run_id FROM runs WHERE ended_at < ?)",
                (older_than,),
            )
            conn.execute("DELETE FROM runs WHERE ended_at < ?", (older_than,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise AuditError(f"cannot prune the audit database at {db_path}: {_describe(exc, busy_timeout)}") from None
    finally:
        conn.close()
    return count
