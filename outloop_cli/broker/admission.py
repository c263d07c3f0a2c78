"""May this request go upstream? credential → path → query → decide → size → limits, in one place.

Both ways a request reaches a credential, `/v1/http/<credential>/...` and the egress proxy's intercepted TLS,
go through `Admission.admit`, so a rule, a limit or a refusal cannot differ between them. No I/O: the caller
audits the outcome and forwards or answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from outloop_cli.broker.forward import BadQuery, Injector, upstream_query
from outloop_cli.broker.limits import Limits
from outloop_cli.policy import PathRejected, decide, normalise_path
from outloop_cli.profiles import Credential

MAX_REQUEST_BODY = 256 * 1024 * 1024


@dataclass(frozen=True)
class Admitted:
    credential: Credential
    path: str  # the upstream path below base_url, as the child sent it (validated, not rewritten)
    query: str  # the upstream query, injection applied
    reason: str
    rule: str | None


@dataclass(frozen=True)
class Denial:
    """A refusal as the broker answers and audits it; `credential` is None when the name is unknown."""

    status: int
    code: str  # the error type the child reads
    reason: str  # the audit's reason code
    message: str
    credential: Credential | None
    asked_for: str
    path: str | None = None
    rule: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class Admission:
    def __init__(self, credentials: Mapping[str, Credential], injectors: Mapping[str, Injector],
                 run_token: str | None, limits: Limits) -> None:
        self.credentials = credentials
        self.injectors = injectors
        self.run_token = run_token
        self.limits = limits

    def admit(self, method: str, name: str, path: str, raw_query: str, content_length: int | None
              ) -> Admitted | Denial:
        """Judge one request for credential `name`; `path` is relative to its base_url. Spends budget only when
        every other check passed, so a refused request costs nothing."""
        credential = self.credentials.get(name)
        if credential is None:
            return unknown_credential(name)
        try:
            normalised = normalise_path(path)
        except PathRejected as exc:
            return Denial(400, "bad_request", exc.reason, str(exc), credential, name, path)
        try:
            query = upstream_query(raw_query, self.injectors[name], self.run_token)
        except BadQuery as exc:
            return Denial(400, "bad_request", "bad_query", str(exc), credential, name, path)
        decision = decide(method, normalised, credential.allow, credential.deny)
        if not decision.allowed:
            message = (f"{method} {short(path)} is not allowed for {name!r}"
                       + (f" (denied by rule {decision.rule!r})" if decision.rule else " (no allow rule matches)"))
            return Denial(403, "denied", decision.reason, message, credential, name, path, decision.rule)
        if content_length is not None and content_length > MAX_REQUEST_BODY:
            # Refused before anything goes upstream; a chunked body is cut at the same size while it streams.
            return Denial(413, "bad_request", "body_too_large", f"request body larger than {MAX_REQUEST_BODY} bytes",
                          credential, name, path, decision.rule)
        verdict = self.limits.admit(name)
        if not verdict.ok:
            scope = "this run" if verdict.scope == "run" else f"credential {name!r}"
            message = (f"rate limit of {credential.rate} reached for {scope}" if verdict.reason == "rate_limited"
                       else f"max_requests reached for {scope}")
            headers = {"Retry-After": str(max(1, round(verdict.retry_after)))} if verdict.retry_after else {}
            return Denial(429, verdict.reason, verdict.reason, message, credential, name, path, decision.rule,
                          headers)
        return Admitted(credential, path, query, decision.reason, decision.rule)


def unknown_credential(name: str) -> Denial:
    # Same answer whether the name exists in another workspace or nowhere: no oracle for other clients.
    return Denial(404, "unknown_credential", "unknown_credential",
                  f"no credential named {short(name, 64)!r} in this workspace", None, name)


def short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
