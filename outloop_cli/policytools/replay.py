"""`outloop policy replay`: the audit's past requests judged again by the current profile, or a draft.

Only what the audit keeps can be replayed: method, credential and path. Query values and bodies are never stored,
so the guard's body scan and query checks cannot be replayed; requests the guard refused are counted apart.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field

from outloop_cli.audit.store import iter_events
from outloop_cli.broker.admission import HTTP_PREFIX, MAX_AUDITED_PATH, Admitted, admit
from outloop_cli.policy_snapshot import policy_hash
from outloop_cli.profiles import Profile

# Reasons that are the policy's own verdict on method, credential and path; other denials (limits, sizes, the
# guard, the HTTP parser) do not say what the rules thought.
REPLAYABLE = frozenset({"allowed", "no_matching_rule", "denied_by_rule", "unknown_credential"})


@dataclass(frozen=True)
class Change:
    credential: str
    request: str
    before: str  # "allow (rule)" / "deny (reason)"
    after: str
    count: int


@dataclass
class Replay:
    policy_hash: str
    replayed: int = 0
    not_replayable: int = 0
    recorded_policies: dict[str, int] = field(default_factory=dict)  # policy hash -> runs in the window
    now_denied: list[Change] = field(default_factory=list)
    now_allowed: list[Change] = field(default_factory=list)
    changed_rule: list[Change] = field(default_factory=list)  # same decision, another rule decides


def replay(conn: sqlite3.Connection, profile: Profile, *, since: float) -> Replay:
    result = Replay(policy_hash(profile))
    rows = conn.execute("SELECT coalesce(policy_hash, 'unrecorded'), count(*) FROM runs WHERE workspace = ? "
                        "AND started_at >= ? GROUP BY 1 ORDER BY 2 DESC", (profile.workspace, since)).fetchall()
    result.recorded_policies = {str(digest): int(count) for digest, count in rows}
    changes: Counter[tuple[str, str, str, str, str]] = Counter()
    for event in iter_events(conn, workspace=profile.workspace, since=since):
        if event.kind != "request":
            continue
        if (event.reason not in REPLAYABLE or not event.credential or not event.method or not event.path
                or len(event.path) > MAX_AUDITED_PATH):
            result.not_replayable += 1
            continue
        result.replayed += 1
        outcome = admit(event.method, f"{HTTP_PREFIX}{event.credential}{event.path}", profile)
        before = _verdict(event.decision == "allow", event.reason or "", event.rule)
        if isinstance(outcome, Admitted):
            rule = outcome.decision.rule if outcome.decision else None
            after = _verdict(True, "allowed", rule)
        else:
            after = _verdict(False, outcome.reason, outcome.rule)
        if after != before:
            kind = ("now_denied" if before.startswith("allow") and after.startswith("deny") else
                    "now_allowed" if before.startswith("deny") and after.startswith("allow") else "changed_rule")
            changes[(kind, event.credential, f"{event.method} {event.path}", before, after)] += 1
    for (kind, credential, request, before, after), count in sorted(changes.items()):
        getattr(result, kind).append(Change(credential, request, before, after, count))
    return result


def _verdict(allowed: bool, reason: str, rule: str | None) -> str:
    if allowed:
        return f"allow by {rule!r}" if rule else "allow"
    return f"deny: {reason}" + (f" ({rule!r})" if rule else "")
