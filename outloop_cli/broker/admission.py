"""The broker's admission chain as one pure function: route, credential, path, query, guard, decision.

The live broker (`server.py`) and `outloop policy test` both call `admit`, so what the tool says about a request
is what a run would do with it. The egress proxy's requests (intercepted TLS, absolute-form `http://`) are routed
to a credential by `broker/intercept.py` and then judged by `admit_credential`, the same chain. Stateful checks
that need the live request (body size, rate limits, the body's guard scan) stay in the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from outloop_cli.broker.forward import BadQuery, check_query, refuses_presigned
from outloop_cli.broker.guard import GUARD_REASON, masked_path, request_texts
from outloop_cli.guard import Guard, Identifier
from outloop_cli.policy import Decision, NormalisedPath, PathRejected, decide, normalise_path
from outloop_cli.profiles import Credential, Profile

HTTP_PREFIX = "/v1/http/"
SECRET_PREFIX = "/v1/secret/"
RUN_INFO = "/v1/run"
MAX_AUDITED_PATH = 1024


@dataclass(frozen=True)
class Denial:
    """A refusal and everything the audit row and the error answer need."""

    status: int
    code: str  # the error type the child reads: bad_request, denied, unknown_credential...
    reason: str  # the audit's reason code
    message: str
    credential: Credential | None = None
    asked_for: str | None = None  # the credential name the child asked for, when it is not ours
    rule: str | None = None
    path: str | None = None  # what the audit records as the path (the upstream path when known)
    identifier: Identifier | None = None  # for foreign_identifier: which declaration matched
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Admitted:
    """A request the policy lets through; for `http`, `decision` names the allow rule."""

    route: Literal["run_info", "reveal", "http"]
    credential: Credential | None = None
    path: str = ""  # the upstream path, byte for byte as it goes out
    normalised: NormalisedPath | None = None
    raw_query: str = ""
    decision: Decision | None = None


def admit(method: str, raw_target: str, profile: Profile, guard: Guard | None = None) -> Admitted | Denial:
    """Judge a request line the HTTP parser accepted; the caller has already authenticated the peer."""
    raw_path, _, raw_query = raw_target.partition("?")
    if raw_path.startswith(HTTP_PREFIX):
        return _admit_http(method, raw_path, raw_query, profile, guard)
    if raw_path.startswith(SECRET_PREFIX):
        return _admit_reveal(method, raw_path[len(SECRET_PREFIX):], profile)
    if raw_path == RUN_INFO:
        if method != "GET":
            return Denial(400, "bad_request", "bad_method", "use GET /v1/run")
        return Admitted("run_info", path=RUN_INFO)
    return Denial(400, "bad_request", "unknown_route", "routes: GET /v1/run, ANY /v1/http/<credential>/<path>, "
                  "GET /v1/secret/<credential>")


def unknown_credential(name: str) -> Denial:
    # Same answer whether the name exists in another workspace or nowhere: no oracle for other clients.
    return Denial(404, "unknown_credential", "unknown_credential",
                  f"no credential named {short(name, 64)!r} in this workspace", asked_for=name)


def _admit_reveal(method: str, name: str, profile: Profile) -> Admitted | Denial:
    credential = profile.credentials.get(name)
    if credential is None:
        return unknown_credential(name)
    path = f"/v1/secret/{name}"
    if method != "GET":
        return Denial(400, "bad_request", "bad_method", "use GET /v1/secret/<credential>", credential, path=path)
    if not credential.reveal:
        return Denial(403, "denied", "reveal_not_allowed", f"credential {name!r} has reveal = false", credential,
                      path=path)
    return Admitted("reveal", credential, path=path)


def _admit_http(method: str, raw_path: str, raw_query: str, profile: Profile,
                guard: Guard | None) -> Admitted | Denial:
    name, slash, rest = raw_path[len(HTTP_PREFIX):].partition("/")
    return admit_credential(method, name, slash + rest if slash else "/", raw_query, profile, guard)


def admit_credential(method: str, name: str, upstream_path: str, raw_query: str, profile: Profile,
                     guard: Guard | None = None) -> Admitted | Denial:
    """Judge a request for credential `name`, its path relative to base_url: the one chain behind
    /v1/http/<credential>/ and the egress proxy's intercepted and absolute-form requests alike."""
    credential = profile.credentials.get(name)
    if credential is None:
        return unknown_credential(name)
    try:
        path = normalise_path(upstream_path)
    except PathRejected as exc:
        return Denial(400, "bad_request", exc.reason, str(exc), credential, path=upstream_path)
    try:
        check_query(raw_query, refuses_presigned(credential))
    except BadQuery as exc:
        return Denial(400, "bad_request", "bad_query", str(exc), credential, path=upstream_path)
    decision = decide(method, path, credential.allow, credential.deny)
    if not decision.allowed:
        message = (f"{method} {short(upstream_path)} is not allowed for {name!r}"
                   + (f" (denied by rule {decision.rule!r})" if decision.rule else " (no allow rule matches)"))
        return Denial(403, "denied", decision.reason, message, credential, rule=decision.rule, path=upstream_path)
    if guard is not None:
        found = guard.search(request_texts(path, raw_query))
        if found is not None:
            return foreign_identifier(credential, found, masked_path(path, guard))
    return Admitted("http", credential, upstream_path, path, raw_query, decision)


def foreign_identifier(credential: Credential, identifier: Identifier, path: str) -> Denial:
    """The child learns only that another client's identifier was found; the audit row names which declaration
    (never the matched text, which is client data)."""
    return Denial(403, "denied", GUARD_REASON, "the request carries an identifier that another workspace declared "
                  "in its [guard]; outloop refused it before it went upstream", credential, rule=identifier.rule,
                  path=path, identifier=identifier)


def short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
