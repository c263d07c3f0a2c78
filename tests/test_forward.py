"""Spec for outloop_cli.broker.forward: what goes upstream (headers, query, injection) and what comes back."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable

import pytest

from outloop_cli.broker.forward import (
    HOP_BY_HOP,
    UPSTREAM_ACCEPT_ENCODING,
    BadQuery,
    BodyTooLarge,
    Injector,
    child_response_headers,
    counted,
    rewrite_location,
    upstream_headers,
    upstream_query,
)
from outloop_cli.broker.redact import secret_variants
from outloop_cli.profiles import Credential, Injection
from outloop_cli.secrets import Secret

TOKEN = "outloop-run-token-123"  # the run's base-URL placeholder
HEADER = Injector(header=("X-Api-Key", "real-secret"), query=None)
BEARER = Injector(header=("Authorization", "Bearer real-secret"), query=None)
QUERY = Injector(header=None, query=("hapikey", "real%2Fsecret"))
NOTHING = Injector(header=None, query=None)


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def credential(inject: Injection, base_url: str = "https://api.example.com") -> Credential:
    return Credential(name="crm", owner="acme", secret_ref="keyring", base_url=base_url, inject=inject,
                      allow=(), deny=())


# ----- Injector ------------------------------------------------------------------------------------------------


def test_injector_fills_the_header_template_with_the_secret() -> None:
    cred = credential(Injection("header", "Authorization", "Bearer {secret}"))
    assert Injector.for_credential(cred, Secret("s3cret")) == Injector(("Authorization", "Bearer s3cret"), None)


def test_injector_builds_basic_auth_from_user_and_secret() -> None:
    injector = Injector.for_credential(credential(Injection("basic", "api")), Secret("s3cret"))
    assert injector.header is not None
    name, value = injector.header
    assert name == "Authorization"
    assert base64.b64decode(value.removeprefix("Basic ")) == b"api:s3cret"


def test_injector_url_encodes_a_query_secret() -> None:
    injector = Injector.for_credential(credential(Injection("query", "hapikey")), Secret("a/b c&d=e"))
    assert injector == Injector(None, ("hapikey", "a%2Fb%20c%26d%3De"))


# ----- upstream_headers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_headers_drop_hop_by_hop_headers(name: str) -> None:
    headers = upstream_headers(raw((name, "x"), ("Accept", "*/*")), HEADER, None)
    assert name not in headers
    assert headers["Accept"] == "*/*"


@pytest.mark.parametrize("name", ["Host", "Authorization", "Cookie2", "Forwarded", "X-Forwarded-For",
                                  "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Prefix",
                                  "X-Real-IP", "Expect", "Content-Length", "Proxy-Authorization"])
@pytest.mark.parametrize("spelling", [str, str.lower, str.upper])
def test_headers_drop_auth_and_forwarding_headers_the_child_sent(name: str,
                                                                 spelling: Callable[[str], str]) -> None:
    headers = upstream_headers(raw((spelling(name), "child-value")), HEADER, None)
    assert "child-value" not in headers.values()


@pytest.mark.parametrize("name", ["Outloop-Decision", "outloop-anything", "OUTLOOP-TOKEN"])
def test_headers_drop_outloop_headers(name: str) -> None:
    assert name not in upstream_headers(raw((name, "x")), HEADER, None)


@pytest.mark.parametrize("connection", ["close, X-Hop", "X-Hop", "keep-alive,x-hop", "  X-HOP  ,Upgrade"])
def test_headers_drop_headers_listed_in_connection(connection: str) -> None:
    headers = upstream_headers(raw(("Connection", connection), ("X-Hop", "1"), ("X-Keep", "2")), HEADER, None)
    assert "X-Hop" not in headers
    assert headers["X-Keep"] == "2"


@pytest.mark.parametrize("spelling", ["X-Api-Key", "x-api-key", "X-API-KEY", "x-Api-kEY"])
def test_headers_set_the_injected_header_once_whatever_case_the_child_used(spelling: str) -> None:
    headers = upstream_headers(raw((spelling, "child-key"), (spelling, "again")), HEADER, None)
    assert headers.getall("x-api-key") == ["real-secret"]


def test_headers_inject_authorization_over_the_childs() -> None:
    headers = upstream_headers(raw(("authorization", "Bearer child")), BEARER, None)
    assert headers.getall("Authorization") == ["Bearer real-secret"]


@pytest.mark.parametrize("injector", [QUERY, NOTHING])
def test_headers_without_header_injection_still_drop_the_childs_authorization(injector: Injector) -> None:
    assert "Authorization" not in upstream_headers(raw(("Authorization", "Bearer child")), injector, None)


@pytest.mark.parametrize(("name", "value"), [
    ("X-Api-Key", TOKEN),
    ("Api-Key", f"Token {TOKEN}"),
    ("X-Goog-Api-Key", TOKEN + "suffix"),
    ("Cookie", f"session={TOKEN}"),
])
def test_headers_drop_any_header_carrying_the_run_token(name: str, value: str) -> None:
    headers = upstream_headers(raw((name, value), ("Accept", "*/*")), BEARER, TOKEN)
    assert all(TOKEN not in v for v in headers.values())
    assert headers["Accept"] == "*/*"


def test_headers_keep_a_value_without_the_token_when_token_dropping_is_on() -> None:
    assert upstream_headers(raw(("X-Trace", "abc")), BEARER, TOKEN)["X-Trace"] == "abc"


def test_headers_keep_ordinary_headers_their_order_and_repeats() -> None:
    sent = raw(("Content-Type", "application/json"), ("X-B", "1"), ("Accept", "a"), ("X-B", "2"),
               ("User-Agent", "loop/1"))
    headers = upstream_headers(sent, HEADER, None)
    assert [(k, v) for k, v in headers.items() if k not in ("X-Api-Key", "Accept-Encoding")] == [
        ("Content-Type", "application/json"), ("X-B", "1"), ("Accept", "a"), ("X-B", "2"), ("User-Agent", "loop/1"),
    ]


@pytest.mark.parametrize("child_value", [None, "br", "zstd, gzip", "identity"])
def test_headers_ask_upstream_only_for_encodings_the_broker_can_inspect(child_value: str | None) -> None:
    sent = raw(("Accept-Encoding", child_value)) if child_value else []
    assert upstream_headers(sent, HEADER, None).getall("Accept-Encoding") == [UPSTREAM_ACCEPT_ENCODING]


def test_headers_pass_latin1_values_unchanged() -> None:
    headers = upstream_headers([(b"X-Name", b"caf\xe9")], HEADER, None)
    assert headers["X-Name"] == "café"


# ----- upstream_query --------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "a=1", "b=2&a=1&b=3", "q=%E2%9C%93&x=a+b", "list=1,2,3&p=/x:y@z?w",
                                   "flag", "a=&b", "k=v=w"])
def test_query_is_kept_byte_for_byte_in_order(query: str) -> None:
    assert upstream_query(query, NOTHING, None) == query


@pytest.mark.parametrize(("query", "expected"), [
    ("", "hapikey=real%2Fsecret"),
    ("a=1", "a=1&hapikey=real%2Fsecret"),
    ("b=2&a=1", "b=2&a=1&hapikey=real%2Fsecret"),
])
def test_query_appends_the_injected_parameter_last(query: str, expected: str) -> None:
    assert upstream_query(query, QUERY, None) == expected


@pytest.mark.parametrize("child_param", ["hapikey=evil", "hapikey=", "hapikey", "%68apikey=evil", "hapi%6Bey=evil",
                                         "%68%61%70%69%6b%65%79=evil"])
def test_query_drops_the_childs_parameter_named_like_the_injected_one(child_param: str) -> None:
    out = upstream_query(f"a=1&{child_param}&b=2", QUERY, None)
    assert out == "a=1&b=2&hapikey=real%2Fsecret"


@pytest.mark.parametrize("child_param", ["hapikey2=x", "xhapikey=x", "a=hapikey", "HAPIKEY=x"])
def test_query_keeps_parameters_that_only_resemble_the_injected_one(child_param: str) -> None:
    assert upstream_query(child_param, QUERY, None) == f"{child_param}&hapikey=real%2Fsecret"


def test_query_drops_empty_pairs() -> None:
    assert upstream_query("a=1&&b=2&", NOTHING, None) == "a=1&b=2"


@pytest.mark.parametrize("param", [f"key={TOKEN}", f"key=x{TOKEN}y", "key=" + TOKEN.replace("-", "%2D")])
def test_query_drops_parameters_carrying_the_run_token(param: str) -> None:
    assert upstream_query(f"a=1&{param}", QUERY, TOKEN) == "a=1&hapikey=real%2Fsecret"


@pytest.mark.parametrize("query", ["a=b c", "a=1\r\nX: y", "a=1\n", "a=%zz", "a=%2", "a=é", "a=\"x\"", "a=<x>",
                                   "a=b#frag", "a=[1]", "a={}", "a=\\", "a=|", "a=\x00", "a=^"])
def test_query_refuses_characters_that_must_be_percent_encoded(query: str) -> None:
    with pytest.raises(BadQuery, match="must be percent-encoded"):
        upstream_query(query, QUERY, None)


def test_bad_query_is_a_value_error() -> None:
    assert issubclass(BadQuery, ValueError)


# ----- rewrite_location ------------------------------------------------------------------------------------

BASE = "https://api.example.com"
PREFIXED = "https://api.example.com/v1"
BROKER = "/v1/http/crm"


@pytest.mark.parametrize(("location", "expected"), [
    ("https://api.example.com/crm/next", "/v1/http/crm/crm/next"),
    ("https://API.Example.COM/x", "/v1/http/crm/x"),
    ("HTTPS://api.example.com/x", "/v1/http/crm/x"),
    ("//api.example.com/x?page=2", "/v1/http/crm/x?page=2"),
    ("/crm/next?page=2&t=12:00", "/v1/http/crm/crm/next?page=2&t=12:00"),
    ("/x#fragment", "/v1/http/crm/x"),
    ("/", "/v1/http/crm/"),
    ("/a/../b", "/v1/http/crm/b"),
])
def test_location_on_the_same_origin_is_mapped_onto_the_broker(location: str, expected: str) -> None:
    assert rewrite_location(location, BASE, BROKER) == expected


@pytest.mark.parametrize("location", ["next", "next?page=2", "?page=2", "?since=2024-01-01T00:00:00Z",
                                      "next?t=12:00", "./next", "a/b/c", "#top"])
def test_location_relative_to_the_current_path_is_returned_as_is(location: str) -> None:
    assert rewrite_location(location, BASE, BROKER) == location


@pytest.mark.parametrize("location", ["../other", "../../openai/chat/completions", "a/../../b", "..", "x/..?q=1"])
def test_location_relative_with_dot_dot_is_refused_as_it_may_leave_the_credential(location: str) -> None:
    assert rewrite_location(location, BASE, BROKER) is None


@pytest.mark.parametrize("location", [" //evil.example/x", "\\\\evil.example/x", "\t/x", "a b"])
def test_location_relative_that_a_lenient_client_could_read_as_another_host_is_refused(location: str) -> None:
    assert rewrite_location(location, BASE, BROKER) is None


@pytest.mark.parametrize("location", [
    "https://evil.example/x",  # other host
    "https://api.example.com.evil.example/x",  # lookalike host
    "https://evil.example@api.example.com/x",  # user info
    "//evil.example/x",  # scheme-relative to another host
    "http://api.example.com/x",  # scheme downgrade
    "https://api.example.com:8443/x",  # other port
    "ftp://api.example.com/x",
    "mailto:someone@example.com",
    "javascript:alert(1)",
    "data:text/html,x",
])
def test_location_leaving_the_base_origin_is_refused(location: str) -> None:
    assert rewrite_location(location, BASE, BROKER) is None


@pytest.mark.parametrize(("location", "expected"), [
    ("https://api.example.com/v1/models", "/v1/http/crm/models"),
    ("/v1/models?limit=5", "/v1/http/crm/models?limit=5"),
    ("/v1", "/v1/http/crm/"),
    ("/v1/", "/v1/http/crm/"),
])
def test_location_under_the_base_path_drops_the_prefix(location: str, expected: str) -> None:
    assert rewrite_location(location, PREFIXED, BROKER) == expected


@pytest.mark.parametrize("location", ["/v10/models", "/v2/models", "/", "/other/v1/models", "/v1/../admin",
                                      "https://api.example.com/v1x"])
def test_location_outside_the_base_path_is_refused(location: str) -> None:
    assert rewrite_location(location, PREFIXED, BROKER) is None


def test_location_keeps_the_port_of_a_base_url_with_one() -> None:
    base = "http://127.0.0.1:8080/api"
    assert rewrite_location("http://127.0.0.1:8080/api/x", base, BROKER) == "/v1/http/crm/x"
    assert rewrite_location("http://127.0.0.1:9090/api/x", base, BROKER) is None


# ----- child_response_headers -------------------------------------------------------------------------------

VARIANTS = secret_variants(["real-secret"])


@pytest.mark.parametrize("name", [*sorted(HOP_BY_HOP), "Content-Length", "content-encoding"])
def test_response_headers_drop_hop_by_hop_length_and_encoding(name: str) -> None:
    headers = child_response_headers(raw((name, "x"), ("Content-Type", "text/plain")), VARIANTS, None)
    assert name not in headers
    assert headers["Content-Type"] == "text/plain"


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("Set-Cookie", "key=real-secret; Path=/", "key=***********; Path=/"),
    ("X-Echo", "Bearer real-secret", "Bearer ***********"),
    ("WWW-Authenticate", 'Bearer error="real-secret is invalid"', 'Bearer error="*********** is invalid"'),
    ("X-Encoded", base64.b64encode(b"real-secret").decode(), "*" * 16),
    ("X-Other", "harmless", "harmless"),
])
def test_response_headers_mask_secrets_in_values(name: str, value: str, expected: str) -> None:
    assert child_response_headers(raw((name, value)), VARIANTS, None)[name] == expected


def test_response_headers_replace_location_with_the_rewritten_one() -> None:
    sent = raw(("Location", "https://api.example.com/next"), ("X-A", "1"))
    headers = child_response_headers(sent, VARIANTS, "/v1/http/crm/next")
    assert headers.getall("Location") == ["/v1/http/crm/next"]
    assert headers["X-A"] == "1"


def test_response_headers_keep_location_redacted_when_not_rewritten() -> None:
    headers = child_response_headers(raw(("Location", "/cb?key=real-secret")), VARIANTS, None)
    assert headers["Location"] == "/cb?key=***********"


def test_response_headers_keep_repeated_headers_in_order() -> None:
    headers = child_response_headers(raw(("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")), VARIANTS, None)
    assert headers.getall("Set-Cookie") == ["a=1", "b=2"]


# ----- counted -------------------------------------------------------------------------------------------------


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _drain(body: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in body]


def test_counted_passes_chunks_and_counts_bytes() -> None:
    counter = [0]
    assert asyncio.run(_drain(counted(_chunks(b"ab", b"cde"), counter, 5))) == [b"ab", b"cde"]
    assert counter == [5]


def test_counted_stops_a_body_over_the_limit() -> None:
    counter = [0]
    with pytest.raises(BodyTooLarge, match="larger than 4 bytes") as caught:
        asyncio.run(_drain(counted(_chunks(b"ab", b"cde"), counter, 4)))
    assert caught.value.limit == 4
