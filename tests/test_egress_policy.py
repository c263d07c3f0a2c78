"""The egress proxy's decisions, in process and without sockets: rules, CONNECT heads, routing, admission.

Each concern of the proxy is a pure function; these tables are its spec. The same requests over real sockets
and real clients are in test_proxy_clients.py and adversarial/test_proxy_hostile.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from outloop_cli.broker.admission import Denial, admit, admit_credential
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
from outloop_cli.broker.intercept import Routed, ToBroker, route_absolute, route_intercepted
from outloop_cli.errors import ProfileError
from outloop_cli.profiles import Profile, load_profile

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


@pytest.mark.parametrize(("target", "hosts", "expected"), [
    ("/v1/chat?stream=1", ["llm.example.com"], Routed("llm", "/chat", "stream=1")),
    ("/v1/admin/keys", ["llm.example.com:443"], Routed("llm-admin", "/keys", "")),  # the longest base path wins
    ("/v1", ["llm.example.com"], Routed("llm", "/", "")),
    ("/v2/chat", ["llm.example.com"], (403, "outside_base_url")),
    ("/v1x/chat", ["llm.example.com"], (403, "outside_base_url")),
    ("/v1/chat", ["other.example"], (400, "host_mismatch")),
    ("/v1/chat", ["llm.example.com:8443"], (400, "host_mismatch")),
    ("/v1/chat", ["llm.example.com", "llm.example.com"], (400, "host_mismatch")),
    ("/v1/chat", [], (400, "host_mismatch")),
    ("https://other.example/v1/chat", ["llm.example.com"], (400, "not_origin_form")),
    ("*", ["llm.example.com"], (400, "not_origin_form")),
])
def test_requests_inside_an_intercepted_connection_are_routed_by_the_connect_target(
        target: str, hosts: list[str], expected: Routed | tuple[int, str]) -> None:
    assert isinstance(LLM, Intercept)
    routed = route_intercepted(target, hosts, LLM, TARGET)
    if isinstance(expected, tuple):
        assert isinstance(routed, Denial) and (routed.status, routed.reason) == expected
    else:
        assert routed == expected


@pytest.mark.parametrize(("target", "expected"), [
    ("http://localhost:8080/x?y=1", Routed("local", "/x", "y=1")),
    ("http://localhost/x", Routed("local", "/x", "")),  # no port: whichever port the credential's base_url names
    ("http://api.github.com/repos/acme", Routed("github", "/repos/acme", "")),  # judged, sent over https
    ("http://127.0.0.1:9999/v1/run", ToBroker("/v1/run")),  # OUTLOOP_URL through the proxy: the broker itself
    ("http://localhost:8081/x", (403, "egress_denied")),
    ("http://pypi.org/simple/", (403, "egress_denied")),  # egress hosts are tunnels (CONNECT), never plain http
    ("http://llm.example.com/v2/x", (403, "egress_denied")),  # the host's credentials cover only /v1
    ("http://user@api.github.com/", (400, "not_absolute_form")),
    ("/v1/http/github/x", (400, "not_absolute_form")),
])
def test_absolute_form_requests_are_routed_by_their_own_host(target: str, expected: Routed | ToBroker | tuple[int, str]
                                                              ) -> None:
    routed = route_absolute(target, POLICY, ("127.0.0.1", 9999))
    if isinstance(expected, tuple):
        assert isinstance(routed, Denial) and (routed.status, routed.reason) == expected
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


# ----- admission: the one chain every route uses -----------------------------------------------------------


ADMISSION_PROFILE = """
version = 1
[credentials.crm]
secret = "env:CRM"
base_url = "https://crm.example.com/api"
inject = { query = "key" }
allow = ["GET /contacts/**", "POST /contacts"]
deny = ["* /contacts/*/merge"]
"""


@pytest.mark.parametrize(("method", "path", "query", "status", "reason"), [
    ("GET", "/contacts/1", "limit=5", 200, "allowed"),
    ("GET", "/contacts/../admin", "", 400, "dot_segment"),
    ("GET", "/contacts/a%2Fb", "", 400, "encoded_slash"),
    ("GET", "/contacts/1", "a b", 400, "bad_query"),
    ("DELETE", "/contacts/1", "", 403, "no_matching_rule"),
    ("POST", "/contacts/1/merge", "", 403, "denied_by_rule"),
])
def test_the_proxy_s_requests_and_v1_http_get_one_verdict(tmp_path: Path, method: str, path: str, query: str,
                                                         status: int, reason: str) -> None:
    """The proxy routes a request to (credential, path, query); `admit_credential` is what /v1/http/ runs too."""
    (tmp_path / "acme.toml").write_text(ADMISSION_PROFILE)
    profile: Profile = load_profile("acme", [tmp_path])
    proxied = admit_credential(method, "crm", path, query, profile)
    direct = admit(method, f"/v1/http/crm{path}" + (f"?{query}" if query else ""), profile)
    assert proxied == direct
    if isinstance(proxied, Denial):
        assert (proxied.status, proxied.reason) == (status, reason)
    else:
        assert status == 200 and proxied.path == path and proxied.raw_query == query
    assert admit_credential(method, "nope", path, query, profile) == admit(method, f"/v1/http/nope{path}", profile)
