"""The egress proxy's requests: which credential judges them, under which path. Pure, so each refusal has an
in-process test.

Inside an intercepted TLS connection the CONNECT target decided the host; a request must agree with it
(origin-form, one Host header naming it) and must lie under a credential's base_url path. An absolute-form
`http://` request names its own host, which must be a credential's (or OUTLOOP_URL, the broker itself). What the
request then may do is `admission.admit_credential`'s call, exactly as for `/v1/http/<credential>/...`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from outloop_cli.broker.admission import Denial
from outloop_cli.broker.egress import Authority, EgressPolicy, Intercept, host_header_matches, parse_absolute_http


@dataclass(frozen=True)
class Routed:
    credential: str
    path: str  # relative to the credential's base_url path
    query: str  # raw, without the "?"


@dataclass(frozen=True)
class ToBroker:
    """An absolute-form request to OUTLOOP_URL (an SDK in base-URL mode whose client honours HTTP_PROXY)."""

    target: str  # origin-form: path and query


def route_intercepted(raw_target: str, host_values: Sequence[str], intercept: Intercept, target: Authority
                      ) -> Routed | Denial:
    raw_path, _, raw_query = raw_target.partition("?")
    if not raw_path.startswith("/"):
        # Absolute-form inside a tunnel could name a third host; asterisk-form (h2's preface) means nothing here.
        return Denial(400, "bad_request", "not_origin_form", "inside an intercepted connection only origin-form "
                      "requests (GET /path) are accepted", path=raw_path)
    if not host_header_matches(host_values, target):
        return Denial(400, "bad_request", "host_mismatch", f"the Host header must name {target}, the CONNECT "
                      "target, exactly once", path=raw_path)
    routed = intercept.route(raw_path)
    if routed is None:
        paths = ", ".join(sorted(entry.base_path or "/" for entry in intercept.credentials))
        return Denial(403, "denied", "outside_base_url", f"{target} is reached through outloop only under {paths}",
                      path=raw_path)
    entry, relative = routed
    return Routed(entry.name, relative, raw_query)


def route_absolute(raw_target: str, policy: EgressPolicy, own_authority: tuple[str, int] | None
                   ) -> Routed | ToBroker | Denial:
    """`GET http://host/path` to the proxy: a credential's host is judged like /v1/http/, OUTLOOP_URL is the
    broker itself; anything else is refused and never reaches the host."""
    parsed = parse_absolute_http(raw_target)
    if parsed is None:
        return Denial(400, "bad_request", "not_absolute_form", "a request to the proxy names its target as "
                      "http://host/path", path=raw_target.partition("?")[0])
    host, port, path, query = parsed
    if own_authority is not None and (host, port or 80) == own_authority:
        return ToBroker(path + query)
    intercept = policy.plain_http(host, port)
    routed = intercept.route(path) if intercept is not None else None
    if routed is None:
        return Denial(403, "denied", "egress_denied", f"http://{host}{f':{port}' if port else ''} is not a "
                      "credential's host; outloop forwards plain http only to those", path=path)
    entry, relative = routed
    return Routed(entry.name, relative, query.removeprefix("?"))
