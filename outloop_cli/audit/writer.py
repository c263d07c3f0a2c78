"""The per-run writer: a run's events committed in order, chained and counted.

The broker records through it; the decision is on disk before the request may go upstream. A writer thread
commits what is queued, sharing one commit among concurrent decisions (group commit). A decision made while
nothing else is in flight has nobody to share a commit with: it is committed on the caller's own thread, which
spares the two thread hand-offs that otherwise cost more latency than the commit (see `commit_here`).
Outcomes never wake anybody: they ride on the next commit, or the writer's next tick.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

from outloop_cli.audit.chain import (
    COLUMN_KEYWORDS,
    EVENT_COLUMNS,
    GENESIS_HASH,
    canonical_json,
    check_decision,
    column_value,
    event_hash,
    is_error,
    json_object,
    now,
    text_value,
)
from outloop_cli.audit.schema import (
    DEFAULT_BUSY_TIMEOUT,
    LOCK_POLL_MS,
    describe_error,
    is_busy,
    open_rw,
    retry_while_busy,
)
from outloop_cli.errors import AuditError

if TYPE_CHECKING:
    import asyncio  # imported lazily at run time: `outloop audit` and `--help` never need an event loop

# Caps one group commit so a burst cannot hold the write lock (and every other run) for long.
_MAX_BATCH: Final = 512
# Kinds with their own method: they feed the counters and the run_end cross-check, so never generic.
_RESERVED_KINDS: Final = frozenset({"run_start", "run_end", "request", "response"})


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
    reason: str | None = None  # e.g. foreign_identifier_flagged: delivered, but marked
    rule: str | None = None  # what marked or withheld it (a guard identifier rule), never the data itself


_CHECKPOINT_SECONDS = 1.0
# How long an outcome may wait for a decision to share its commit; kill -9 within it loses only outcomes.
_OUTCOME_DELAY: Final = 0.1
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
    retried: bool = False  # an outcome already in one failed batch; lost if a second one fails too


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
        batch_id: str | None = None,
        policy_hash: str | None = None,
    ) -> None:
        self.db_path = db_path
        self.batch_id = batch_id
        self.policy_hash = policy_hash
        self.run_id = run_id
        self.workspace = workspace
        self._conn = conn
        self._command = canonical_json(command)
        self._sandbox = None if sandbox is None else canonical_json(sandbox)
        self._busy_timeout = busy_timeout
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        # Fire-and-forget outcomes, in order. Appending wakes nobody: a thread hand-off per outcome cost more than
        # its share of a commit. The next commit takes them, whoever makes it; the writer looks every tick.
        self._outcomes: collections.deque[_Item] = collections.deque()
        self._committing = threading.Lock()  # held by whoever is committing: the writer, or commit_here's caller
        self._lock = threading.Lock()
        self._closed = False
        # Owned by the writer thread once it runs.
        self._seq = 0
        self._head = GENESIS_HASH
        self._allowed = 0
        self._denied = 0
        self._errors = 0  # allowed requests whose outcome failed (is_error)
        self._lost = 0  # fire-and-forget events whose batch failed; reported in run_end
        self._commits = 0  # transactions committed so far
        self._retry: list[_Item] = []  # outcomes of the last failed batch, written before anything newer
        self._retry_alone = False
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

        ``detail`` is stored on run_start (its ``sandbox``, ``batch_id`` and ``policy_hash`` entries also on the
        runs row); the command is added to it so the runs row can be checked against the chain.
        """
        start_detail = {**json_object(detail, "run detail"), "command": list(command)}
        conn = open_rw(db_path, busy_timeout)
        conn.execute(f"PRAGMA busy_timeout = {LOCK_POLL_MS}")  # _begin keeps the full deadline
        batch_id, policy_hash = start_detail.get("batch_id"), start_detail.get("policy_hash")
        log = cls(
            conn,
            db_path=db_path,
            run_id=run_id,
            workspace=workspace,
            command=list(command),
            sandbox=start_detail.get("sandbox"),
            batch_id=batch_id if isinstance(batch_id, str) else None,
            policy_hash=policy_hash if isinstance(policy_hash, str) else None,
            busy_timeout=busy_timeout,
        )
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        log._commit([_Item("run_start", now(), {"detail": start_detail}, started)])
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

    async def record_request_async(self, rec: RequestRecord, *, alone: bool = False) -> int:
        """As record_request, without blocking the event loop for long.

        ``alone``: the caller has nothing else in flight, so no other decision could share this one's commit;
        it is then committed right here (commit_here) when the writer is idle, else queued as usual.
        """
        make = functools.partial(self._request_item, rec)
        if alone:
            seq = self.commit_here(make)
            if seq is not None:
                return seq
        return await self._wait_async(make)

    def record_response(self, rec: ResponseRecord) -> None:
        """Keep a response event for the next commit (at most one writer tick away); nobody waits for it."""
        item = self._response_item(rec, None)
        with self._lock:
            if self._closed:
                raise AuditError(f"the audit log of run {self.run_id} is already closed")
            self._outcomes.append(item)

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
        columns = {name: fields.pop(name) for name in list(fields) if name in COLUMN_KEYWORDS}
        if "decision" in columns:
            check_decision(columns["decision"])
        detail = {**fields, **extra}
        values = {name: column_value(name, value) for name, value in columns.items()}
        if detail:
            values["detail"] = json_object(detail, f"{kind} event detail")
        return self._wait(functools.partial(_Item, text_value(kind), now(), values))

    def finish(self, *, exit_code: int, duration: float, detail: Mapping[str, object]) -> tuple[str, int]:
        """Commit run_end after everything queued, close the runs row, and stop the writer.

        run_end's detail gets exit_code, duration, allowed, denied, errors, lost_events, commits (the transactions
        that wrote the events before it: group commit's batching, at a glance) and the chain's head hash and event
        count before it (these win over same-named caller keys). Returns the final head hash and
        the event count including run_end, for the run summary.
        """
        end = _End(int(exit_code), float(duration), json_object(detail, "run end detail"))
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._submit(_Item("run_end", now(), {}, future, end), last=True)
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
        check_decision(rec.decision)
        fields = {
            name: column_value(name, getattr(rec, name))
            for name in ("credential", "method", "host", "path", "decision", "reason", "rule", "status")
        }
        return _Item("request", now(), fields, waiter)

    def _response_item(self, rec: ResponseRecord, waiter: _Waiter) -> _Item:
        fields = {
            name: column_value(name, getattr(rec, name))
            for name in ("request_seq", "status", "latency_ms", "bytes_in", "bytes_out", "error", "reason", "rule")
        }
        return _Item("response", now(), fields, waiter)

    def commit_here(self, make: Callable[[_Waiter], _Item]) -> int | None:
        """Commit one waited-for event on this thread, with the outcomes kept so far; None when it cannot be done
        here without waiting (the writer is committing or has work queued, or another process holds the
        database's write lock: one short try, LOCK_POLL_MS), and the caller should queue it instead.

        The chain, the counters, fail-closed and kill -9 safety are the writer's own: the same _commit runs,
        under the same lock. AuditError: the event is not on disk.
        """
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        item = make(done)  # a bad value fails here, before the write lock is taken
        if not self._committing.acquire(blocking=False):
            return None
        try:
            with self._lock:
                if self._closed or self._retry or not self._queue.empty():
                    return None
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:  # a lock, or anything else SQLite says: as on the writer's thread
                if is_busy(exc):
                    return None
                raise AuditError(f"cannot write to the audit database at {self.db_path}: "
                                 f"{describe_error(exc, self._busy_timeout)}") from None
            batch = self._take_outcomes([])
            batch.append(item)
            self._commit(batch, begun=True)
        finally:
            self._committing.release()
        return done.result()  # settled by _commit: the seq, or the AuditError that refuses the request

    def _take_outcomes(self, batch: list[_Item]) -> list[_Item]:
        while self._outcomes and len(batch) < _MAX_BATCH:
            batch.append(self._outcomes.popleft())
        return batch

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
                batch, stop = self._next_batch()
                if batch:
                    with self._committing:
                        self._commit(batch)
                if stop:
                    return
        finally:
            self._conn.close()

    def _next_batch(self) -> tuple[list[_Item], bool]:
        """The outcomes a failed batch left over (alone, or followed by whatever is queued), else whatever is
        queued plus the outcomes kept so far; True once the queue has ended (every outcome goes before run_end).

        A batch holding only outcomes (nobody waits for them) is held back until a waited-for event arrives or
        a tick (_OUTCOME_DELAY) passes: each outcome then rides on the next decision's commit instead of taking a
        commit of its own just before it. Idle, the writer still wakes every tick, since outcomes wake nobody.
        """
        with self._committing:  # a failing commit_here may be setting it
            batch, self._retry = self._retry, []
        if batch and self._retry_alone:
            return batch, False
        waited = False  # whether somebody waits for this batch (outcomes never do)
        ticked = False  # a tick passed with nothing waited-for arriving: commit the outcomes taken
        while len(self._take_outcomes(batch)) < _MAX_BATCH:
            if self._retry:
                break  # commit_here's batch failed: its outcomes go next, in a batch of their own making
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if batch and (waited or ticked):
                    break  # commit now
                try:
                    item = self._queue.get(timeout=_OUTCOME_DELAY)
                except queue.Empty:
                    ticked = True
                    continue
            if item is None:
                return batch, True
            if item.end is not None:  # run_end: every outcome kept goes before it, however many
                while self._outcomes:  # one by one: a commit_here under way may be taking some of them too
                    batch.append(self._outcomes.popleft())
            else:
                self._take_outcomes(batch)
            batch.append(item)
            waited = waited or item.waiter is not None
        return batch, False

    def _commit(self, batch: list[_Item], *, begun: bool = False) -> None:
        """Write a batch as one transaction, then tell every waiter; on failure undo the in-memory chain.

        ``begun``: the caller already holds the write lock (BEGIN IMMEDIATE).
        """
        saved = (self._seq, self._head, self._allowed, self._denied, self._errors)
        try:
            try:
                rows = [self._chain(item) for item in batch]
            except BaseException:
                if begun:
                    self._conn.execute("ROLLBACK")
                raise
            if not begun:
                self._begin()
            try:
                if saved[0] == 0:
                    self._conn.execute(
                        "INSERT INTO runs (run_id, workspace, command, started_at, sandbox, batch_id, policy_hash) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.run_id, self.workspace, self._command, rows[0]["ts"], self._sandbox, self.batch_id,
                         self.policy_hash),
                    )
                self._conn.executemany(_INSERT_EVENT, rows)
                self._conn.execute(
                    "UPDATE runs SET allowed = ?, denied = ?, errors = ?, head_hash = ?, event_count = ? "
                    "WHERE run_id = ?",
                    (self._allowed, self._denied, self._errors, self._head, self._seq, self.run_id),
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
            self._seq, self._head, self._allowed, self._denied, self._errors = saved
            # Only SQLite's own message is shown: it names files and columns, never a bound value.
            if isinstance(exc, sqlite3.Error):
                reason = describe_error(exc, self._busy_timeout)
            else:
                reason = f"unexpected {type(exc).__name__}"
            message = f"cannot write to the audit database at {self.db_path}: {reason}"
            # Every waiter is refused: its decision is not on disk, so its request must not go upstream. An outcome
            # (its request went up long ago) gets one more chance: with the next batch when the database was only
            # locked, else alone, since the row that broke this batch may have been a neighbour's.
            self._retry = [replace(item, retried=True) for item in batch if item.waiter is None and not item.retried]
            self._retry_alone = not (isinstance(exc, sqlite3.Error) and is_busy(exc))
            self._lost += sum(1 for item in batch if item.waiter is None and item.retried)
            _notify([(item.waiter, AuditError(message)) for item in batch])
            return
        self._commits += 1
        for seq, item in enumerate(batch, start=saved[0]):
            if item.kind == "response":
                self._open_requests.pop(item.fields["request_seq"], None)
            elif item.kind == "request" and item.fields["decision"] == "allow":
                f = item.fields
                self._open_requests[seq] = (f["credential"], f["method"], f["host"], f["path"])
        _notify([(item.waiter, seq) for seq, item in enumerate(batch, start=saved[0])])

    def _begin(self) -> None:
        """Take the write lock, polling every LOCK_POLL_MS until the busy timeout (see retry_while_busy)."""
        retry_while_busy(self._conn, self._busy_timeout, lambda: self._conn.execute("BEGIN IMMEDIATE"))

    def _chain(self, item: _Item) -> dict[str, object]:
        """Give an item its seq and hash, advancing the in-memory chain and counters."""
        fields = dict(item.fields)
        if item.kind == "request":
            if fields["decision"] == "allow":
                self._allowed += 1
            else:
                self._denied += 1
        elif item.kind == "response":
            if is_error(fields["status"], fields["error"]):
                self._errors += 1
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
                "errors": self._errors,
                "lost_events": self._lost,
                "commits": self._commits,
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
