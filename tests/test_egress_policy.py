"""The egress proxy's decisions, in process and without sockets: rules, CONNECT heads, routing, admission.

Each concern of the proxy is a pure function; these tables are its spec. The same requests over real sockets
and real clients are in test_proxy_clients.py and adversarial/test_proxy_hostile.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from outloop_cli.broker.admission import Admission, Admitted, Denial
from outloop_cli.broker.connect import BadConnect, parse_connect, raw_response
from outloop_cli.broker.egress import (
    Authority,
    EgressError,
    EgressPolicy,
    Intercept,
    Refuse,
    Tunnel,
    credential_hosts,
    host_header_matches,
    parse_absolute_http,
    parse_authority,
    parse_egress_rule,
)
from outloop_cli.broker.forward import Injector
from outloop_cli.broker.intercept import Mismatch, Routed, route_intercepted
from outloop_cli.broker.limits import Limits
from outloop_cli.errors import ProfileError
from outloop_cli.profiles import Profile, load_profile
from outloop_cli.secrets import Secret

POLICY = EgressPolicy(
    credential_hosts({"github": "https://api.github.com", "llm": "https://llm.example.com/v1",
                      "llm-admin": "https://llm.example.com/v1/admin", "local": "http://localhost:8080",
                      "byip": "https://10.0.0.5"}),
    [parse_egress_rule(text) for text in ("pypi.org", "*.githubusercontent.com", "index.example:8443",
                                          "api.github.com", "10.0.0.9")])


@pytest.mark.parametrize(("text", "host", "port", "wildcard"), [
    ("pypi.org", "pypi.org", 443, False),
    ("PyPI.org:8443", "pypi.org", 8443, False),
    ("*.githubusercontent.com", "githubusercontent.com", 443, True),
    ("*.example.com:80", "example.com", 80, True),
    ("10.0.0.9", "10.0.0.9", 443, False),
    ("[::1]:8443", "::1", 8443, False),
])
def test_egress_rules_parse(text: str, host: str, port: int, wildcard: bool) -> None:
    rule = parse_egress_rule(text)
    assert (rule.host, rule.port, rule.wildcard) == (host, port, wildcard)


@pytest.mark.parametrize("text", ["https://pypi.org", "pypi.org/simple", "pypi.org:0", "pypi.org:99999", "*",
                                  "*.10.0.0.1", "pypi.org.", "a..b", "exa mple.com", "pypi.org:443:1", "::1", ""])
def test_bad_egress_rules_are_refused(text: str) -> None:
    with pytest.raises(EgressError):
        parse_egress_rule(text)


def test_a_bad_egress_entry_names_the_file_key_and_fix(tmp_path: Path) -> None:
    (tmp_path / "acme.toml").write_text('version = 1\n[run]\negress = ["pypi.org", "https://x.org"]\n')
    with pytest.raises(ProfileError) as caught:
        load_profile("acme", [tmp_path])
    assert "acme.toml: run.egress[1]" in caught.value.message and "host name, host:port" in caught.value.message


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "acme.toml").write_text('version = 1\n[credentials.x]\nsecret = "env:X"\n'
                                        'base_url = "https://x.org"\nca_file = "nope.pem"\n')
    with pytest.raises(ProfileError) as caught:
        load_profile("acme", [tmp_path])
    assert "credentials.x.ca_file" in caught.value.message and str(tmp_path / "nope.pem") in caught.value.message


def test_proxy_must_be_a_boolean(tmp_path: Path) -> None:
    (tmp_path / "acme.toml").write_text('version = 1\n[run]\nproxy = "yes"\n')
    with pytest.raises(ProfileError, match=r"run\.proxy"):
        load_profile("acme", [tmp_path])


@pytest.mark.parametrize(("target", "expected"), [
    ("api.github.com:443", Intercept),  # a credential's host wins over the same host in egress: judged, not blind
    ("API.GitHub.com:443", Intercept),
    ("llm.example.com:443", Intercept),
    ("pypi.org:443", Tunnel),
    ("objects.githubusercontent.com:443", Tunnel),
    ("githubusercontent.com:443", Refuse),  # "*." needs a label in front of the domain
    ("pypi.org:8443", Refuse),  # no port in the rule means 443
    ("index.example:8443", Tunnel),
    ("localhost:8080", Refuse),  # a credential's host reached by plain http is never tunnelled
    ("10.0.0.5:443", Refuse),  # an IP-addressed credential host: never tunnelled, never intercepted
    ("10.0.0.9:443", Tunnel),  # an address listed in egress, as written
    ("140.82.112.6:443", Refuse),  # an IP literal nobody listed
    ("evil.example:443", Refuse),
    ("api.github.com.evil.example:443", Refuse),
])
def test_connect_targets_are_intercepted_tunnelled_or_refused(target: str, expected: type) -> None:
    assert isinstance(POLICY.decide(parse_authority(target)), expected)


def test_refusals_say_egress_denied() -> None:
    decision = POLICY.decide(parse_authority("evil.example:443"))
    assert isinstance(decision, Refuse) and decision.reason == "egress_denied"


def test_the_ca_may_vouch_only_for_https_credential_hosts_named_by_dns() -> None:
    assert POLICY.intercepted_names == ["api.github.com", "llm.example.com"]


@pytest.mark.parametrize("text", ["api.github.com", "api.github.com:", ":443", "[::1", "::1:443", "a b:443",
                                  "api.github.com:443/x", "api.github.com:65536", "api_github.com:443"])
def test_bad_connect_targets(text: str) -> None:
    with pytest.raises(EgressError):
        parse_authority(text)


@pytest.mark.parametrize(("head", "host", "port"), [
    (b"CONNECT api.github.com:443 HTTP/1.1\r\nHost: api.github.com:443\r\n\r\n", "api.github.com", 443),
    (b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n", "::1", 8443),
    (b"CONNECT pypi.org:443 HTTP/1.0\r\nUser-Agent: pip\r\nProxy-Connection: keep-alive\r\n\r\n", "pypi.org", 443),
])
def test_connect_heads_parse(head: bytes, host: str, port: int) -> None:
    parsed = parse_connect(head)
    assert (parsed.target.host, parsed.target.port) == (host, port)


@pytest.mark.parametrize("head", [
    b"CONNECT api.github.com:443 HTTP/1.1\r\n",  # incomplete
    b"CONNECT api.github.com:443 HTTP/2.0\r\n\r\n",
    b"CONNECT  api.github.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT http://api.github.com/ HTTP/1.1\r\n\r\n",
    b"CONNECT api.github.com:443 HTTP/1.1\r\nBad Header\r\n\r\n",
    b"CONNECT api.github.com:443 HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"CONNECT api.github.com:443 HTTP/1.1\nHost: x\n\n",
    b"",
])
def test_malformed_connect_heads_are_refused(head: bytes) -> None:
    with pytest.raises(BadConnect):
        parse_connect(head)


def test_a_raw_refusal_carries_its_length_and_closes() -> None:
    raw = raw_response(403, [("Content-Type", "application/json")], b"{}")
    assert raw == (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n"
                   b"Content-Type: application/json\r\n\r\n{}")
    assert raw_response(200) == b"HTTP/1.1 200 Connection Established\r\n\r\n"


TARGET = Authority("llm.example.com", 443, False)
LLM = POLICY.decide(TARGET)


@pytest.mark.parametrize(("path", "hosts", "expected"), [
    ("/v1/chat", ["llm.example.com"], Routed("llm", "/chat")),
    ("/v1/admin/keys", ["llm.example.com:443"], Routed("llm-admin", "/keys")),  # the longest base path wins
    ("/v1", ["llm.example.com"], Routed("llm", "/")),
    ("/v2/chat", ["llm.example.com"], Mismatch(403, "outside_base_url", "")),
    ("/v1x/chat", ["llm.example.com"], Mismatch(403, "outside_base_url", "")),
    ("/v1/chat", ["other.example"], Mismatch(400, "host_mismatch", "")),
    ("/v1/chat", ["llm.example.com:8443"], Mismatch(400, "host_mismatch", "")),
    ("/v1/chat", ["llm.example.com", "llm.example.com"], Mismatch(400, "host_mismatch", "")),
    ("/v1/chat", [], Mismatch(400, "host_mismatch", "")),
    ("https://other.example/v1/chat", ["llm.example.com"], Mismatch(400, "not_origin_form", "")),
    ("*", ["llm.example.com"], Mismatch(400, "not_origin_form", "")),
])
def test_requests_inside_an_intercepted_connection_are_routed_by_the_connect_target(
        path: str, hosts: list[str], expected: Routed | Mismatch) -> None:
    assert isinstance(LLM, Intercept)
    routed = route_intercepted(path, hosts, LLM, TARGET)
    if isinstance(expected, Mismatch):
        assert isinstance(routed, Mismatch) and (routed.status, routed.reason) == (expected.status, expected.reason)
    else:
        assert routed == expected


@pytest.mark.parametrize(("values", "ok"), [
    (["llm.example.com"], True), (["LLM.example.com:443"], True), (["llm.example.com:80"], False),
    (["llm.example.com."], False), (["llm.example.com@evil"], False), ([" llm.example.com"], False),
])
def test_host_header_must_name_the_connect_target(values: list[str], ok: bool) -> None:
    assert host_header_matches(values, TARGET) is ok


@pytest.mark.parametrize(("raw", "parsed"), [
    ("http://localhost:8080/a/b?x=1", ("localhost", 8080, "/a/b", "?x=1")),
    ("http://api.github.com", ("api.github.com", None, "/", "")),
    ("HTTP://[::1]:80/x", ("::1", 80, "/x", "")),
    ("http://user@api.github.com/", None),
    ("https://api.github.com/", None),
    ("/relative", None),
    ("http://api.github.com:99999/", None),
    ("http://api github.com/", None),
])
def test_absolute_form_targets(raw: str, parsed: tuple[str, int | None, str, str] | None) -> None:
    assert parse_absolute_http(raw) == parsed


# ----- admission: the one chain both routes use ------------------------------------------------------------


ADMISSION_PROFILE = """
version = 1
[run]
max_requests = 100
[credentials.crm]
secret = "env:CRM"
base_url = "https://crm.example.com/api"
inject = { query = "key" }
allow = ["GET /contacts/**", "POST /contacts"]
deny = ["* /contacts/*/merge"]
max_requests = 2
"""


@pytest.fixture
def admission(tmp_path: Path) -> Admission:
    (tmp_path / "acme.toml").write_text(ADMISSION_PROFILE)
    profile: Profile = load_profile("acme", [tmp_path])
    injectors = {name: Injector.for_credential(cred, Secret("s3cret")) for name, cred in profile.credentials.items()}
    limits = Limits(profile.run.max_requests, {name: (cred.rate, cred.max_requests)
                                               for name, cred in profile.credentials.items()})
    return Admission(profile.credentials, injectors, "outloop-token", limits)


@pytest.mark.parametrize(("method", "name", "path", "query", "length", "status", "reason"), [
    ("GET", "nope", "/contacts/1", "", None, 404, "unknown_credential"),
    ("GET", "crm", "/contacts/../admin", "", None, 400, "dot_segment"),
    ("GET", "crm", "/contacts/a%2Fb", "", None, 400, "encoded_slash"),
    ("GET", "crm", "/contacts/1", "a b", None, 400, "bad_query"),
    ("DELETE", "crm", "/contacts/1", "", None, 403, "no_matching_rule"),
    ("POST", "crm", "/contacts/1/merge", "", None, 403, "denied_by_rule"),
    ("POST", "crm", "/contacts", "", 300 * 1024 * 1024, 413, "body_too_large"),
])
def test_each_refusal_of_the_admission_chain(admission: Admission, method: str, name: str, path: str, query: str,
                                             length: int | None, status: int, reason: str) -> None:
    verdict = admission.admit(method, name, path, query, length)
    assert isinstance(verdict, Denial), verdict
    assert (verdict.status, verdict.reason) == (status, reason)
    assert admission.limits.credential_budgets["crm"].remaining == 2  # a refusal spends no budget


def test_admitted_requests_get_the_injected_query_and_spend_budget_until_it_is_gone(admission: Admission) -> None:
    first = admission.admit("GET", "crm", "/contacts/1", "key=child&limit=5", None)
    assert isinstance(first, Admitted)
    assert (first.path, first.query, first.rule) == ("/contacts/1", "limit=5&key=s3cret", "GET /contacts/**")
    assert isinstance(admission.admit("GET", "crm", "/contacts/2", "", None), Admitted)
    third = admission.admit("GET", "crm", "/contacts/3", "", None)
    assert isinstance(third, Denial) and (third.status, third.reason) == (429, "budget_exhausted")
