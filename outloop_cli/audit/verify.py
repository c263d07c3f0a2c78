"""Recompute each run's hash chain and cross-check it against the runs row and the run_end record.

This is what turns "the log says so" into evidence: an edited, deleted or truncated event is reported by seq.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from outloop_cli.audit.chain import EVENT_COLUMNS, GENESIS_HASH, event_hash, is_error
from outloop_cli.audit.schema import snapshot
from outloop_cli.audit.store import loads_lenient
from outloop_cli.errors import UsageError


@dataclass(frozen=True)
class RunVerdict:
    """The outcome for one run; ``first_bad_seq`` is where an operator should start looking."""

    run_id: str
    status: str  # "ok" | "incomplete" | "broken" | "pruned"
    events: int
    problem: str | None
    first_bad_seq: int | None


@dataclass
class _Chain:
    """What walking a run's events established, up to the first problem."""

    count: int = 0
    head: str = GENESIS_HASH
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    start: dict[str, object] | None = None
    end: dict[str, object] | None = None
    problem: str | None = None
    bad_seq: int | None = None


def _stop(chain: _Chain, problem: str, seq: int) -> _Chain:
    chain.problem, chain.bad_seq = problem, seq
    return chain


def walk_chain(rows: Iterable[tuple[object, ...]]) -> _Chain:
    """Walk one run's events (EVENT_COLUMNS + hash, in seq order) up to the first problem; the central verify
    walks shipped chains with it too, so both copies are held to one definition of intact."""
    chain = _Chain()
    for row in rows:
        fields = dict(zip((*EVENT_COLUMNS, "hash"), row, strict=True))
        seq = chain.count
        if fields["seq"] != seq:
            return _stop(chain, f"event {seq} is missing (the next stored event is {fields['seq']!r})", seq)
        if chain.end is not None:
            return _stop(chain, f"event {seq} comes after the run_end event", seq)
        if fields["prev_hash"] != chain.head:
            return _stop(chain, f"event {seq} does not link to event {seq - 1} (prev_hash was altered)", seq)
        try:
            digest = event_hash(fields)
        except (TypeError, ValueError):
            return _stop(chain, f"event {seq} holds a value no writer stores (altered)", seq)
        if digest != fields["hash"]:
            return _stop(chain, f"event {seq} was altered (its hash does not match its fields)", seq)
        kind = fields["kind"]
        if (seq == 0) != (kind == "run_start"):
            return _stop(chain, f"event {seq} is a {kind!r} event; only event 0 may be run_start", seq)
        if kind == "request":
            if fields["decision"] == "allow":
                chain.allowed += 1
            else:
                chain.denied += 1
        elif kind == "response" and is_error(fields["status"], fields["error"]):
            chain.errors += 1
        detail = loads_lenient(fields["detail"])
        if kind == "run_start":
            chain.start = {**fields, "detail": detail if isinstance(detail, dict) else {}}
        elif kind == "run_end":
            if not isinstance(detail, dict):
                return _stop(chain, f"run_end event {seq} has no readable detail", seq)
            expected = {"head_hash": chain.head, "event_count": seq, "allowed": chain.allowed,
                        "denied": chain.denied, "errors": chain.errors}  # fmt: skip
            if "errors" not in detail:
                del expected["errors"]  # recorded before outcomes were counted (schema 1)
            wrong = sorted(key for key, value in expected.items() if detail.get(key) != value)
            if wrong:
                problem = f"run_end event {seq} records {', '.join(wrong)} unlike the chain before it"
                return _stop(chain, problem, seq)
            chain.end = {**fields, "detail": detail}
        chain.head = digest
        chain.count += 1
    return chain


def _compare_run(run: dict[str, object], chain: _Chain) -> tuple[str, int] | None:
    """The first disagreement between the (unhashed) runs row and the chain, with the seq it concerns."""
    last = chain.count - 1
    start, end = chain.start, chain.end
    assert start is not None
    if end is None and run["ended_at"] is not None:
        return (
            f"the run ended but its events stop at {last}: events from {chain.count} on were deleted",
            chain.count,
        )
    if end is not None and run["ended_at"] is None:
        return "the runs row says unfinished but the chain holds a run_end event", last
    if run["event_count"] != chain.count:
        recorded = run["event_count"]
        at = min(recorded, chain.count) if isinstance(recorded, int) else chain.count
        return f"the runs row counts {recorded!r} events but the chain holds {chain.count}", at
    if run["head_hash"] != chain.head:
        return "the runs row's head hash does not match the chain's head", last
    if (run["allowed"], run["denied"], run["errors"]) != (chain.allowed, chain.denied, chain.errors):
        return "the runs row's allowed/denied/errors counts do not match the chain", last
    start_detail = start["detail"]
    assert isinstance(start_detail, dict)
    if (run["workspace"], run["started_at"]) != (start["workspace"], start["ts"]):
        return "the runs row's workspace or start time does not match run_start", 0
    recorded_start = (loads_lenient(run["command"]), loads_lenient(run["sandbox"]))
    if recorded_start != (start_detail.get("command"), start_detail.get("sandbox")):
        return "the runs row's command or sandbox does not match run_start", 0
    if (run["batch_id"], run["policy_hash"]) != (start_detail.get("batch_id"), start_detail.get("policy_hash")):
        return "the runs row's batch id or policy hash does not match run_start", 0
    if end is not None:
        end_detail = end["detail"]
        assert isinstance(end_detail, dict)
        recorded_end = (run["ended_at"], run["exit_code"], run["duration"])
        if recorded_end != (end["ts"], end_detail.get("exit_code"), end_detail.get("duration")):
            return "the runs row's end time, exit code or duration does not match run_end", last
    return None


_RUN_FIELDS = ("workspace", "command", "started_at", "ended_at", "exit_code", "duration", "allowed",
               "denied", "errors", "sandbox", "head_hash", "event_count", "batch_id", "policy_hash")  # fmt: skip


def verify_run(conn: sqlite3.Connection, run_id: str) -> RunVerdict:
    """Check one run from a single snapshot, so a live run's next commit cannot look like tampering.

    Raises UsageError when the database has never heard of ``run_id``.
    """
    with snapshot(conn):
        row = conn.execute(f"SELECT {', '.join(_RUN_FIELDS)} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        marker = conn.execute("SELECT event_count FROM pruned WHERE run_id = ?", (run_id,)).fetchone()
        chain = walk_chain(
            conn.execute(
                f"SELECT {', '.join((*EVENT_COLUMNS, 'hash'))} FROM events WHERE run_id = ? ORDER BY seq",
                (run_id,),
            )
        )

    def broken(problem: str, seq: int | None) -> RunVerdict:
        return RunVerdict(run_id, "broken", chain.count, problem, seq)

    if marker is not None:
        if row is None and chain.count == 0 and chain.problem is None:
            recorded = marker[0]
            return RunVerdict(run_id, "pruned", recorded if isinstance(recorded, int) else 0, None, None)
        return broken("the run is marked pruned but still has a runs row or events", 0)
    if row is None:
        if chain.count == 0 and chain.problem is None:
            raise UsageError(f"no run {run_id} in the audit database")
        return broken("events exist but the run's record in the runs table was deleted", 0)
    if chain.problem is not None:
        return broken(chain.problem, chain.bad_seq)
    if chain.count == 0:
        return broken("the run has no events: its run_start event was deleted", 0)
    mismatch = _compare_run(dict(zip(_RUN_FIELDS, row, strict=True)), chain)
    if mismatch is not None:
        return broken(*mismatch)
    return RunVerdict(run_id, "ok" if chain.end is not None else "incomplete", chain.count, None, None)


def verify_all(conn: sqlite3.Connection) -> list[RunVerdict]:
    """Every run the database knows of (runs, prune markers, or orphaned events), oldest id first."""
    with snapshot(conn):
        run_ids = [
            run_id
            for (run_id,) in conn.execute(
                "SELECT run_id FROM runs UNION SELECT run_id FROM pruned UNION SELECT run_id FROM events ORDER BY 1"
            )
        ]
        return [verify_run(conn, run_id) for run_id in run_ids]
