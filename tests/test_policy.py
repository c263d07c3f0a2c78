"""Spec for the policy: which rule strings parse, which request paths are refused, and what decide() says."""

from __future__ import annotations

import pytest

from outloop_cli.policy import (
    MAX_PATH_BYTES,
    REJECTION_REASONS,
    Decision,
    NormalisedPath,
    PathRejected,
    Rule,
    RuleError,
    decide,
    match_glob,
    normalise_path,
    parse_rule,
)

# ---------------------------------------------------------------------------------------------------------
# normalise_path: refusals. Every reason code has at least one example here (checked below).

REFUSED: list[tuple[str, str]] = [
    # (raw path, reason)
    ("a/b", "not_absolute"),
    ("", "not_absolute"),
    ("crm/v3", "not_absolute"),
    ("%2Fa", "not_absolute"),
    ("/" + "a" * 5000, "path_too_long"),
    ("/" + "a" * MAX_PATH_BYTES, "path_too_long"),
    ("/a#frag", "fragment"),
    ("/a#", "fragment"),
    ("/a?x=1", "query"),
    ("/a\\b", "backslash"),
    ("/a/..\\b", "backslash"),
    ("/a%5Cb", "backslash"),
    ("/a%5cb", "backslash"),
    ("/a/b;x=1", "path_parameter"),
    ("/contacts/1/merge;x", "path_parameter"),
    ("/a;/b", "path_parameter"),
    ("/a%3Bb", "path_parameter"),
    ("/a%3bb", "path_parameter"),
    ("/a\r\nb", "control_char"),
    ("/a\x00b", "control_char"),
    ("/a\tb", "control_char"),
    ("/a\x7fb", "control_char"),
    ("/a\nb", "control_char"),
    ("/a%0d%0ab", "control_char"),
    ("/a%00", "control_char"),
    ("/a%09b", "control_char"),
    ("/a%1Fb", "control_char"),
    ("/a%7Fb", "control_char"),
    ("/a%C2%85b", "control_char"),  # U+0085, a C1 control, is valid UTF-8
    ("/caf\u00e9", "non_ascii"),
    ("/\u202eevil", "non_ascii"),
    ("/a/\U0001f600", "non_ascii"),
    ("/a b", "forbidden_char"),
    ('/a"b', "forbidden_char"),
    ("/a<b", "forbidden_char"),
    ("/a>b", "forbidden_char"),
    ("/a^b", "forbidden_char"),
    ("/a`b", "forbidden_char"),
    ("/a{b", "forbidden_char"),
    ("/a|b", "forbidden_char"),
    ("/a}b", "forbidden_char"),
    ("/a[0]", "forbidden_char"),
    ("/a%zz", "bad_percent_encoding"),
    ("/a%2", "bad_percent_encoding"),
    ("/a%", "bad_percent_encoding"),
    ("/a%%41", "bad_percent_encoding"),
    ("/a%u002F", "bad_percent_encoding"),
    ("/a%G0", "bad_percent_encoding"),
    ("/a%2Fb", "encoded_slash"),
    ("/a%2fb", "encoded_slash"),
    ("/%2F", "encoded_slash"),
    ("/a/%2e%2e/b", "encoded_dot"),
    ("/a/%2E/b", "encoded_dot"),
    ("/a/.%2e/b", "encoded_dot"),
    ("/v1%2Ejson", "encoded_dot"),
    ("/a%252Fb", "double_encoding"),
    ("/a%25", "double_encoding"),
    ("/%2525", "double_encoding"),
    ("/%61dmin", "encoded_unreserved"),
    ("/ADMI%4E", "encoded_unreserved"),
    ("/a%30", "encoded_unreserved"),
    ("/a%2Db", "encoded_unreserved"),
    ("/a%5Fb", "encoded_unreserved"),
    ("/a%7Eb", "encoded_unreserved"),
    ("/a%FFb", "invalid_utf8"),
    ("/a%C3", "invalid_utf8"),
    ("/a/%C0%AE%C0%AE/b", "invalid_utf8"),  # overlong encoding of ".."
    ("/a%ED%A0%80", "invalid_utf8"),  # an encoded UTF-16 surrogate
    ("/a/%EF%BC%8E%EF%BC%8E/b", "ambiguous_unicode"),  # fullwidth "..", NFKC folds to ".."
    ("/a%EF%BC%8Fb", "ambiguous_unicode"),  # fullwidth "/", NFKC folds to "/"
    ("/e%CC%81", "ambiguous_unicode"),  # decomposed "é"
    ("//a", "empty_segment"),
    ("/a//b", "empty_segment"),
    ("//", "empty_segment"),
    ("/a//", "empty_segment"),
    ("/a/../b", "dot_segment"),
    ("/a/./b", "dot_segment"),
    ("/..", "dot_segment"),
    ("/.", "dot_segment"),
    ("/a/..", "dot_segment"),
    ("/a/../", "dot_segment"),
]


@pytest.mark.parametrize(("raw", "reason"), REFUSED, ids=[repr(raw)[:40] for raw, _ in REFUSED])
def test_normalise_path_refuses_ambiguous_paths_with_a_reason_code(raw: str, reason: str) -> None:
    with pytest.raises(PathRejected) as caught:
        normalise_path(raw)
    assert caught.value.reason == reason


def test_every_rejection_reason_is_exercised_by_the_spec() -> None:
    assert {reason for _, reason in REFUSED} == set(REJECTION_REASONS)


@pytest.mark.parametrize("reason", sorted(REJECTION_REASONS))
def test_rejection_message_is_human_text_for_its_reason(reason: str) -> None:
    message = str(PathRejected(reason))
    assert message.startswith("request path refused: ")
    assert message == f"request path refused: {REJECTION_REASONS[reason]}"


@pytest.mark.parametrize(
    "raw",
    ["/a\r\nSet-Cookie:x", "/\x1b[31mred", "/secret-looking%zzvalue", "/x;jsessionid=abc", "/" + "q" * 5000],
)
def test_rejection_message_never_echoes_the_path(raw: str) -> None:
    with pytest.raises(PathRejected) as caught:
        normalise_path(raw)
    message = str(caught.value)
    assert raw not in message
    assert raw[1:] not in message
    assert "\r" not in message and "\x1b" not in message


ACCEPTED: list[tuple[str, tuple[str, ...]]] = [
    ("/", ("",)),
    ("/crm/v3/objects/contacts/42", ("crm", "v3", "objects", "contacts", "42")),
    ("/a/b/", ("a", "b", "")),
    ("/files/my%20file", ("files", "my file")),
    ("/@evil.example/x", ("@evil.example", "x")),
    ("/a:b/c", ("a:b", "c")),
    ("/v1/projects/p:run", ("v1", "projects", "p:run")),
    ("/a.json", ("a.json",)),
    ("/...", ("...",)),
    ("/.well-known/x", (".well-known", "x")),
    ("/a/*", ("a", "*")),
    ("/!$&'()*+,=:@-._~", ("!$&'()*+,=:@-._~",)),
    ("/q%3Fx", ("q?x",)),
    ("/h%23x", ("h#x",)),
    ("/a%2bb", ("a+b",)),
    ("/caf%C3%A9", ("café",)),
    ("/caf%c3%a9", ("café",)),
    ("/%E2%9C%93", ("✓",)),
    ("/%7B%7D", ("{}",)),
    ("/" + "a" * (MAX_PATH_BYTES - 1), ("a" * (MAX_PATH_BYTES - 1),)),
]


@pytest.mark.parametrize(("raw", "segments"), ACCEPTED, ids=[raw[:40] for raw, _ in ACCEPTED])
def test_normalise_path_decodes_segments_for_matching(raw: str, segments: tuple[str, ...]) -> None:
    assert normalise_path(raw).segments == segments


@pytest.mark.parametrize("raw", [raw for raw, _ in ACCEPTED], ids=[raw[:40] for raw, _ in ACCEPTED])
def test_normalise_path_keeps_raw_byte_for_byte(raw: str) -> None:
    assert normalise_path(raw).raw == raw


def test_normalise_path_accepts_exactly_max_path_bytes() -> None:
    raw = "/" + "a" * (MAX_PATH_BYTES - 1)
    assert len(raw.encode()) == MAX_PATH_BYTES
    assert normalise_path(raw).raw == raw


def test_normalise_path_treats_host_like_segment_as_an_ordinary_segment() -> None:
    assert normalise_path("/@evil.example/x") == NormalisedPath(
        raw="/@evil.example/x", segments=("@evil.example", "x")
    )


def test_percent_encoding_case_does_not_change_the_decoded_segment() -> None:
    assert normalise_path("/a%3a").segments == normalise_path("/a%3A").segments == ("a:",)


# ---------------------------------------------------------------------------------------------------------
# parse_rule

CUSTOM = ("M-SEARCH", "VERSION_CONTROL")
PARSED: list[tuple[str, str, tuple[str, ...]]] = [
    ("GET /crm/v3/objects/contacts/**", "GET", ("crm", "v3", "objects", "contacts", "**")),
    ("POST /crm/v3/objects/contacts", "POST", ("crm", "v3", "objects", "contacts")),
    ("PATCH /crm/v3/objects/contacts/*", "PATCH", ("crm", "v3", "objects", "contacts", "*")),
    ("* /crm/v3/objects/contacts/*/merge", "*", ("crm", "v3", "objects", "contacts", "*", "merge")),
    ("GET /", "GET", ("",)),
    ("GET /a/b/", "GET", ("a", "b", "")),
    ("GET /**", "GET", ("**",)),
    ("GET /**/x/**", "GET", ("**", "x", "**")),
    ("M-SEARCH /x", "M-SEARCH", ("x",)),
    ("VERSION_CONTROL /x", "VERSION_CONTROL", ("x",)),
    ("GET /@me/a:b/café", "GET", ("@me", "a:b", "café")),
    ("GET /.well-known/x", "GET", (".well-known", "x")),
    ("  GET /a  ", "GET", ("a",)),
    ("\tGET /a\n", "GET", ("a",)),
]


@pytest.mark.parametrize(("text", "method", "segments"), PARSED)
def test_parse_rule_splits_method_and_glob_segments(
    text: str, method: str, segments: tuple[str, ...]
) -> None:
    rule = parse_rule(text, custom_methods=CUSTOM)
    assert (rule.method, rule.segments) == (method, segments)


@pytest.mark.parametrize("text", [text for text, _, _ in PARSED])
def test_parse_rule_keeps_the_text_without_surrounding_whitespace(text: str) -> None:
    assert parse_rule(text, custom_methods=CUSTOM).text == text.strip()


RULE_ERRORS: list[tuple[str, str]] = [
    # (rule text, a fragment the message must contain)
    ("", "empty"),
    ("   ", "empty"),
    ("GET", "exactly one space"),
    ("/a/b", "exactly one space"),
    ("GET  /a", "exactly one space"),
    ("GET\t/a", "exactly one space"),
    ("GET /a /b", "exactly one space"),
    ("GET /my file", "exactly one space"),
    ("get /a", "write GET, not get"),
    ("Post /a", "write POST, not Post"),
    ("/a GET", "write 'GET /a', not '/a GET'"),
    ("GET1 /a", "not valid"),
    ("DELET /items/*", "'DELET' is not a standard HTTP method"),
    ("DELET /items/*", "did you mean DELETE?"),
    ("PTACH /a", "did you mean PATCH?"),
    ("GETS /a", "did you mean GET?"),
    ("PROPFIND /a", "custom_methods = [\"PROPFIND\"]"),
    ("M-SEARCH /x", "custom_methods"),
    ("G.T /a", "not valid"),
    ("** /a", "not valid"),
    ("ÄRGER /a", "not valid"),
    ("GET a/b", "must start with '/'"),
    ("GET *", "must start with '/'"),
    ("GET /a?x=1", "query"),
    ("GET /a#top", "fragment"),
    ("GET /my%20file", "write the path decoded"),
    ("GET /a\\b", "backslash"),
    ("GET /a;x", "';'"),
    ("GET //a", "empty segment"),
    ("GET /a//b", "empty segment"),
    ("GET /a/../b", "'..'"),
    ("GET /a/./b", "'.'"),
    ("GET /v*", "'v*'"),
    ("GET /a/*b", "'*b'"),
    ("GET /a/***", "'***'"),
    ("GET /a/**x/b", "'**x'"),
    ("GET /users/{id}", "'{id}'"),
    ("DELETE /users/<id>", "'<id>'"),
    ("GET /a\x00b", "control character"),
    ("GET /caf\u0065\u0301", "NFKC"),
    ("GET /\uff0fetc", "NFKC"),
]


@pytest.mark.parametrize(("text", "fragment"), RULE_ERRORS)
def test_parse_rule_rejects_bad_rules_saying_what_and_how_to_fix(text: str, fragment: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rule(text)
    assert fragment in str(caught.value)


def test_rule_error_is_a_value_error() -> None:
    assert issubclass(RuleError, ValueError)


def test_rule_error_for_a_mixed_glob_explains_both_glob_forms() -> None:
    with pytest.raises(RuleError, match=r"'\*' \(one segment\) or '\*\*' \(any number of segments\)"):
        parse_rule("GET /v*")


# ---------------------------------------------------------------------------------------------------------
# match_glob


def _glob(text: str) -> tuple[str, ...]:
    return parse_rule(f"GET {text}").segments


def _segments(raw: str) -> tuple[str, ...]:
    return normalise_path(raw).segments


GLOB_CASES: list[tuple[str, str, bool]] = [
    # (glob, path, matches)
    ("/a/b", "/a/b", True),
    ("/a/b", "/a/B", False),
    ("/a/b", "/a/b/", False),
    ("/a/b", "/a", False),
    ("/a/b", "/a/b/c", False),
    ("/a/b/", "/a/b/", True),
    ("/a/b/", "/a/b", False),
    ("/", "/", True),
    ("/", "/a", False),
    # "*": exactly one non-empty segment
    ("/a/*", "/a/x", True),
    ("/a/*", "/a/*", True),
    ("/a/*", "/a", False),
    ("/a/*", "/a/", False),
    ("/a/*", "/a/x/y", False),
    ("/a/*/", "/a/x/", True),
    ("/a/*/c", "/a/x/c", True),
    ("/a/*/c", "/a/c", False),
    ("/a/*/c", "/a/x/y/c", False),
    ("/*", "/", False),
    ("/*", "/x", True),
    # "**": zero or more segments, anywhere, more than once
    ("/a/**", "/a", True),
    ("/a/**", "/a/", True),
    ("/a/**", "/a/x", True),
    ("/a/**", "/a/x/y/z/", True),
    ("/a/**", "/ab", False),
    ("/a/**", "/b/a", False),
    ("/**", "/", True),
    ("/**", "/anything/at/all", True),
    ("/**/merge", "/merge", True),
    ("/**/merge", "/a/b/merge", True),
    ("/**/merge", "/a/b/merge/x", False),
    ("/a/**/c", "/a/c", True),
    ("/a/**/c", "/a/b/b/c", True),
    ("/a/**/c", "/a/b/c/d", False),
    ("/**/x/**", "/x", True),
    ("/**/x/**", "/a/x/b", True),
    ("/**/x/**", "/a/y/b", False),
    ("/**/**", "/", True),
    ("/a/**/*", "/a", False),
    ("/a/**/*", "/a/b", True),
    ("/a/**/*", "/a/b/", False),
    ("/a/**/", "/a/", True),
    ("/a/**/", "/a/b/", True),
    ("/a/**/", "/a/b", False),
    # literals match the decoded segment exactly
    ("/files/*", "/files/my%20file", True),
    ("/café", "/caf%C3%A9", True),
    ("/a:b", "/a%3Ab", True),
]


@pytest.mark.parametrize(("glob", "raw", "expected"), GLOB_CASES)
def test_match_glob_semantics(glob: str, raw: str, expected: bool) -> None:
    assert match_glob(_glob(glob), _segments(raw)) is expected


def test_match_glob_many_double_stars_stay_fast() -> None:
    pattern = ("**",) * 30 + ("never",)
    segments = ("a",) * 500
    assert match_glob(pattern, segments) is False


def test_match_glob_empty_pattern_matches_only_no_segments() -> None:
    assert match_glob((), ()) is True
    assert match_glob((), ("",)) is False


# ---------------------------------------------------------------------------------------------------------
# decide

HUBSPOT_ALLOW = [
    parse_rule("GET /crm/v3/objects/contacts/**"),
    parse_rule("POST /crm/v3/objects/contacts"),
    parse_rule("PATCH /crm/v3/objects/contacts/*"),
]
HUBSPOT_DENY = [parse_rule("* /crm/v3/objects/contacts/*/merge")]


def _decide(method: str, raw: str, allow: list[Rule], deny: list[Rule]) -> Decision:
    return decide(method, normalise_path(raw), allow, deny)


@pytest.mark.parametrize(
    ("method", "raw", "expected"),
    [
        ("GET", "/crm/v3/objects/contacts", Decision(True, "allowed", "GET /crm/v3/objects/contacts/**")),
        ("GET", "/crm/v3/objects/contacts/42", Decision(True, "allowed", "GET /crm/v3/objects/contacts/**")),
        ("POST", "/crm/v3/objects/contacts", Decision(True, "allowed", "POST /crm/v3/objects/contacts")),
        ("POST", "/crm/v3/objects/contacts/42", Decision(False, "no_matching_rule", None)),
        (
            "PATCH",
            "/crm/v3/objects/contacts/42",
            Decision(True, "allowed", "PATCH /crm/v3/objects/contacts/*"),
        ),
        ("PATCH", "/crm/v3/objects/contacts", Decision(False, "no_matching_rule", None)),
        ("DELETE", "/crm/v3/objects/contacts/42", Decision(False, "no_matching_rule", None)),
        ("GET", "/crm/v3/objects/companies/1", Decision(False, "no_matching_rule", None)),
        (
            "POST",
            "/crm/v3/objects/contacts/42/merge",
            Decision(False, "denied_by_rule", HUBSPOT_DENY[0].text),
        ),
        ("GET", "/crm/v3/objects/contacts/42/merge", Decision(False, "denied_by_rule", HUBSPOT_DENY[0].text)),
    ],
)
def test_decide_on_the_design_example_profile(method: str, raw: str, expected: Decision) -> None:
    assert _decide(method, raw, HUBSPOT_ALLOW, HUBSPOT_DENY) == expected


def test_deny_wins_over_an_allow_that_also_matches() -> None:
    decision = _decide("GET", "/admin/x", [parse_rule("GET /**")], [parse_rule("GET /admin/**")])
    assert decision == Decision(False, "denied_by_rule", "GET /admin/**")


def test_deny_wins_regardless_of_allow_order_or_specificity() -> None:
    allow = [parse_rule("GET /admin/x"), parse_rule("* /**")]
    decision = _decide("GET", "/admin/x", allow, [parse_rule("* /**")])
    assert decision == Decision(False, "denied_by_rule", "* /**")


def test_no_rules_at_all_denies() -> None:
    assert _decide("GET", "/", [], []) == Decision(False, "no_matching_rule", None)


def test_deny_rules_alone_never_allow() -> None:
    assert _decide("GET", "/a", [], [parse_rule("GET /b")]) == Decision(False, "no_matching_rule", None)


def test_first_matching_allow_rule_is_reported() -> None:
    allow = [parse_rule("POST /a"), parse_rule("GET /a/*"), parse_rule("GET /a/**"), parse_rule("* /**")]
    assert _decide("GET", "/a/b", allow, []).rule == "GET /a/*"


def test_first_matching_deny_rule_is_reported() -> None:
    deny = [parse_rule("POST /a/**"), parse_rule("* /a/**"), parse_rule("GET /a/b")]
    assert _decide("GET", "/a/b", [parse_rule("GET /**")], deny).rule == "* /a/**"


@pytest.mark.parametrize(
    "method", ["get", "Get", "gET", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "M-SEARCH", "POST"]
)
def test_get_only_rule_matches_exactly_get(method: str) -> None:
    decision = _decide(method, "/a", [parse_rule("GET /a")], [])
    assert decision == Decision(False, "no_matching_rule", None)


def test_get_rule_matches_get() -> None:
    assert _decide("GET", "/a", [parse_rule("GET /a")], []).allowed is True


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "DELETE", "PROPFIND", "X-CUSTOM", "get", "*"])
def test_star_method_matches_any_valid_method(method: str) -> None:
    assert _decide(method, "/a", [parse_rule("* /a")], []).allowed is True


@pytest.mark.parametrize("method", ["get", "Get"])
def test_star_deny_catches_lowercase_methods(method: str) -> None:
    decision = _decide(method, "/a", [parse_rule("* /a")], [parse_rule("* /a")])
    assert decision.reason == "denied_by_rule"


def test_custom_verb_needs_its_own_rule() -> None:
    assert _decide("PURGE", "/a", [parse_rule("PURGE /a", custom_methods=["PURGE"])], []).allowed is True


@pytest.mark.parametrize(
    "method", ["", " ", "GET ", " GET", "GE T", "GET\r\n", "GET\x00", "G(T", "GÉT", "GET/1.1", "{GET}", "G:T"]
)
def test_non_token_method_is_bad_method_even_under_a_star_rule(method: str) -> None:
    assert _decide(method, "/a", [parse_rule("* /**")], []) == Decision(False, "bad_method", None)


def test_bad_method_is_reported_before_deny_rules() -> None:
    assert _decide("", "/a", [], [parse_rule("* /**")]).reason == "bad_method"


@pytest.mark.parametrize(
    ("glob", "raw", "allowed"),
    [
        ("/", "/", True),
        ("/", "/a", False),
        ("/**", "/", True),
        ("/*", "/", False),
        ("/a/*", "/a", False),
        ("/a/*", "/a/", False),
        ("/a/**", "/a", True),
        ("/a/**", "/a/", True),
        ("/a/", "/a", False),
        ("/a", "/a/", False),
    ],
)
def test_decide_root_trailing_slash_and_zero_segment_semantics(glob: str, raw: str, allowed: bool) -> None:
    assert _decide("GET", raw, [parse_rule(f"GET {glob}")], []).allowed is allowed


def test_encoded_space_matches_single_star_not_literal() -> None:
    assert _decide("GET", "/files/my%20file", [parse_rule("GET /files/*")], []).allowed is True


def test_decided_rule_text_is_the_rule_as_written() -> None:
    rule = parse_rule("  GET /a/**  ")
    assert _decide("GET", "/a/b", [rule], []).rule == "GET /a/**"
