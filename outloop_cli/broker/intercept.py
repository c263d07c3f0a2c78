"""Requests inside an intercepted TLS connection: which credential judges them, and under which path.

The CONNECT target decided the host; a request must agree with it (origin-form, one Host header naming it) and
must lie under a credential's base_url path. What it then may do is the admission chain's call, exactly as for
`/v1/http/<credential>/...`. Pure, so each refusal has an in-process test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from outloop_cli.broker.egress import Authority, Intercept, host_header_matches


@dataclass(frozen=True)
class Routed:
    credential: str
    path: str  # relative to the credential's base_url path


@dataclass(frozen=True)
class Mismatch:
    status: int
    reason: str
    message: str


def route_intercepted(raw_path: str, host_values: Sequence[str], intercept: Intercept, target: Authority
                      ) -> Routed | Mismatch:
    if not raw_path.startswith("/"):
        # Absolute-form inside a tunnel could name a third host; asterisk-form (h2's preface) means nothing here.
        return Mismatch(400, "not_origin_form", "inside an intercepted connection only origin-form requests "
                                                "(GET /path) are accepted")
    if not host_header_matches(host_values, target):
        return Mismatch(400, "host_mismatch", f"the Host header must name {target}, the CONNECT target, "
                                              "exactly once")
    routed = intercept.route(raw_path)
    if routed is None:
        paths = ", ".join(sorted(entry.base_path or "/" for entry in intercept.credentials))
        return Mismatch(403, "outside_base_url", f"{target} is reached through outloop only under {paths}")
    entry, relative = routed
    return Routed(entry.name, relative)
