"""`outloop policy test`: what a run's broker would do with one request line, without running anything.

It goes through the broker's own HTTP parser and admission function, so its answer is the live answer (a test
runs both over the hostile suite's table). Body checks and rate limits need a live request; the verdict says
which limits would count it instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from outloop_cli.broker.admission import HTTP_PREFIX, Admitted, admit
from outloop_cli.broker.wire import parse_request_line
from outloop_cli.errors import UsageError
from outloop_cli.guard import Guard
from outloop_cli.policy import REJECTION_REASONS
from outloop_cli.profiles import Profile


@dataclass(frozen=True)
class Verdict:
    """One request line judged; `refused` is the path-refusal code when the path itself was refused."""

    request: str
    allowed: bool
    status: int  # what the broker answers before going upstream (200: it would go upstream)
    reason: str
    rule: str | None
    message: str
    credential: str | None = None
    path: str | None = None  # the normalised path the rules matched, decoded
    refused: str | None = None
    limits: dict[str, object] | None = None  # what would count this request, when allowed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def split_line(line: str, credential: str | None = None) -> tuple[str, str]:
    """`METHOD TARGET`, TARGET as the loop sends it (/v1/http/<credential>/...), or the upstream path with
    `credential` given."""
    parts = line.strip().split(None, 1)
    if len(parts) != 2 or not parts[1].strip():
        raise UsageError(f"{line.strip()!r}: write a request as \"METHOD /path?query\", e.g. \"GET /v1/http/crm/x\"")
    method, target = parts[0], parts[1].strip()
    if credential is not None:
        if not target.startswith("/"):
            raise UsageError(f"{target!r}: with --credential, give the upstream path, starting with '/'")
        target = f"{HTTP_PREFIX}{credential}{target}"
    return method, target


def check_request(profile: Profile, guard: Guard | None, method: str, target: str) -> Verdict:
    request = f"{method} {target}"
    parsed = parse_request_line(method, target)
    if parsed is None:
        return Verdict(request, False, 400, "malformed_http", None, "the broker's HTTP parser refuses this request "
                       "line (method spelling, characters or length)")
    outcome = admit(*parsed, profile, guard)
    if isinstance(outcome, Admitted):
        credential = outcome.credential
        if outcome.route != "http" or credential is None or outcome.decision is None:
            return Verdict(request, True, 200, "run_info" if outcome.route == "run_info" else "revealed", None,
                           "answered by the broker itself", credential.name if credential else None)
        normalised = outcome.normalised
        limits: dict[str, object] = {"rate": str(credential.rate) if credential.rate else None,
                                     "credential_max_requests": credential.max_requests,
                                     "run_max_requests": profile.run.max_requests,
                                     "body_scanned_by_guard": guard is not None}
        return Verdict(request, True, 200, outcome.decision.reason, outcome.decision.rule,
                       "would be forwarded", credential.name,
                       "/" + "/".join(normalised.segments) if normalised else outcome.path, None, limits)
    credential_name = outcome.credential.name if outcome.credential else outcome.asked_for
    refused = outcome.reason if outcome.reason in REJECTION_REASONS else None
    return Verdict(request, False, outcome.status, outcome.reason, outcome.rule, outcome.message, credential_name,
                   None if refused else outcome.path, refused)
