"""A run's requests counted from its audit events, for the summary: what was allowed, failed, denied, and why.

Counting from the log (each request joined to its outcome) rather than from counters kept beside it means the
summary, `outloop audit` and `--summary-json` cannot disagree, and each request is counted exactly once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import dataclass, field

from outloop_cli.audit.chain import is_error

RATE_LIMIT_STATUS = 429


@dataclass
class Counts:
    """Requests by outcome. ``errors`` are part of ``allowed`` (the policy allowed them, the answer failed);
    ``rate_limited`` are part of ``denied``. Bytes are bodies: sent upstream, and received back from it."""

    allowed: int = 0
    errors: int = 0
    denied: int = 0
    rate_limited: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def requests(self) -> int:
        return self.allowed + self.denied

    def add(self, other: Counts) -> None:
        for name in ("allowed", "errors", "denied", "rate_limited", "bytes_sent", "bytes_received"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Denial:
    """Refused requests sharing a reason; ``status`` 429 marks the rate and budget limits."""

    credential: str | None
    reason: str
    rule: str | None
    status: int | None
    count: int


@dataclass(frozen=True)
class Failure:
    """Allowed requests that failed alike: an upstream status, or the broker's error code (``upstream_timeout``)."""

    credential: str | None
    status: int | None
    error: str | None
    count: int


@dataclass(frozen=True)
class Flag:
    """Responses delivered but marked (the wrong-client guard's `flag`), by credential, reason and rule."""

    credential: str | None
    reason: str
    rule: str | None
    count: int


@dataclass
class Tally:
    """``credentials`` has every profile credential; requests naming none of them (unknown credential, a caller
    that failed authentication, a bad route) are ``unattributed``."""

    credentials: dict[str, Counts]
    unattributed: Counts = field(default_factory=Counts)
    denials: list[Denial] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    @property
    def total(self) -> Counts:
        total = Counts()
        for counts in (*self.credentials.values(), self.unattributed):
            total.add(counts)
        return total


_GROUPED = """
    SELECT q.credential, q.decision, q.reason, q.rule, q.status, r.status, r.error, count(*),
           coalesce(sum(r.bytes_in), 0), coalesce(sum(r.bytes_out), 0)
    FROM events q LEFT JOIN events r ON r.run_id = q.run_id AND r.request_seq = q.seq AND r.kind = 'response'
    WHERE q.run_id = ? AND q.kind = 'request'
    GROUP BY 1, 2, 3, 4, 5, 6, 7
"""


# A response's reason marks one that was delivered but flagged; denials and failures are the request's business.
_FLAGGED = """
    SELECT credential, reason, rule, count(*) FROM events
    WHERE run_id = ? AND kind = 'response' AND reason IS NOT NULL
    GROUP BY 1, 2, 3 ORDER BY 4 DESC
"""


def run_tally(conn: sqlite3.Connection, run_id: str, credentials: Collection[str]) -> Tally:
    """Count one run's requests by credential and outcome."""
    tally = Tally({name: Counts() for name in sorted(credentials)})
    denials: dict[tuple[str | None, str, str | None, int | None], int] = {}
    failures: dict[tuple[str | None, int | None, str | None], int] = {}
    for credential, decision, reason, rule, deny_status, status, error, count, sent, received in conn.execute(
        _GROUPED, (run_id,)
    ):
        counts = tally.credentials.get(credential, tally.unattributed) if credential else tally.unattributed
        counts.bytes_sent += sent
        counts.bytes_received += received
        if decision == "deny":
            counts.denied += count
            if deny_status == RATE_LIMIT_STATUS:
                counts.rate_limited += count
            key = (credential, str(reason), rule, deny_status)
            denials[key] = denials.get(key, 0) + count
            continue
        counts.allowed += count
        if is_error(status, error):
            counts.errors += count
            failures[(credential, status, error)] = failures.get((credential, status, error), 0) + count
    tally.denials = sorted((Denial(*key, count) for key, count in denials.items()), key=lambda d: -d.count)
    tally.failures = sorted((Failure(*key, count) for key, count in failures.items()), key=lambda f: -f.count)
    tally.flags = [Flag(*row) for row in conn.execute(_FLAGGED, (run_id,))]
    return tally
