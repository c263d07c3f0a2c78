"""Properties of the policy that no list of examples can pin down: refusals are total, decisions are sound.

Every property runs derandomized (the same examples on every machine and every run, so a pass in CI means the
same as a pass here), and the encodings random draws once missed are pinned as explicit examples.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from outloop_cli.policy import (
    MAX_PATH_BYTES,
    REJECTION_REASONS,
    Decision,
    NormalisedPath,
    PathRejected,
    Rule,
    RuleError,
    decide,
    normalise_path,
    parse_rule,
)

DETERMINISTIC = settings(derandomize=True, database=None)

# Pieces of path segments: mostly harmless, plus every encoding trick the normaliser must see through.
SAFE_PIECES = [
    "a", "b", "ab", "A", "1", "-", "_", "~", ".", "@", ":", "*", "+", "%20", "%3A", "%C3%A9", "%E2%9C%93",
]  # fmt: skip
TRICK_PIECES = [
    "..", "%2F", "%2f", "%2e", "%2E", "%25", "%252F", "%5C", "%5c", "\\", ";", "%3B", "%00", "%0d%0a", "\r",
    "%61", "%41", "%7E", "%", "%2", "%zz", "%FF", "%C0%AE", "%C2%85", "%EF%BC%8F", "é", "#", "?", " ", "//",
]  # fmt: skip
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

segment_text = st.lists(
    st.one_of(st.sampled_from(SAFE_PIECES), st.sampled_from(TRICK_PIECES)), min_size=0, max_size=3
).map("".join)
tricky_paths = st.builds(
    lambda segments, trailing: "/" + "/".join(segments) + ("/" if trailing else ""),
    st.lists(segment_text, min_size=0, max_size=5),
    st.booleans(),
)
any_path_text = st.one_of(st.text(max_size=60), tricky_paths, st.text(alphabet="/%.2eEfF5cC;a", max_size=30))

rule_methods = st.sampled_from(["GET", "POST", "*"])
request_methods = st.sampled_from(["GET", "POST", "get", "HEAD", "DELETE"])
rule_segment = st.sampled_from(["a", "b", "ab", "é", "a:b", "*", "**"])
rule_texts = st.builds(
    lambda method, segments, trailing: (
        f"{method} /" + "/".join(segments) + ("/" if trailing and segments else "")
    ),
    rule_methods,
    st.lists(rule_segment, min_size=0, max_size=4),
    st.booleans(),
)
rule_lists = st.lists(rule_texts.map(parse_rule), max_size=4)

# Only pieces that survive normalisation, so the decision properties need no assume() and stay fast.
accepted_paths = st.builds(
    lambda segments, trailing: "/" + "/".join(segments) + ("/" if trailing and segments else ""),
    st.lists(
        st.lists(st.sampled_from(["a", "b", "ab", "x", "A", "aB", "%C3%A9", "%3A", "%20"]), min_size=1,
                 max_size=2).map(
            "".join
        ),
        max_size=5,
    ),
    st.booleans(),
)


def _normalised_or_none(raw: str) -> NormalisedPath | None:
    try:
        return normalise_path(raw)
    except PathRejected:
        return None


def _reference_glob_regex(rule_text: str) -> re.Pattern[str]:
    """Translate the glob to a regex over the decoded path string, independently of match_glob."""
    glob = rule_text.split(" ", 1)[1]
    parts = []
    for element in glob[1:].split("/"):
        if element == "**":
            parts.append("(?:/[^/]*)*")
        elif element == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(element))
    return re.compile("".join(parts))


def _reference_matches(rule: Rule, method: str, raw: str) -> bool:
    decoded = unquote(raw, errors="strict")  # what a plain upstream decoder makes of the forwarded bytes
    method_ok = rule.text.split(" ", 1)[0] in ("*", method)
    return method_ok and _reference_glob_regex(rule.text).fullmatch(decoded) is not None


def _reference_deny_matches(rule: Rule, method: str, raw: str) -> bool:
    """Deny rules also catch the path as a lenient upstream reads it: any ASCII case, one trailing slash."""
    decoded = unquote(raw, errors="strict").lower()
    if len(decoded) > 1 and decoded.endswith("/"):
        decoded = decoded[:-1]
    method_ok = rule.text.split(" ", 1)[0] in ("*", method)
    text = rule.text.lower()
    lowered = _reference_glob_regex(text[:-1] if text.endswith("/") and not text.endswith(" /") else text)
    return _reference_matches(rule, method, raw) or (method_ok and lowered.fullmatch(decoded) is not None)


def _reference_decide(method: str, raw: str, allow: list[Rule], deny: list[Rule]) -> Decision:
    for rule in deny:
        if _reference_deny_matches(rule, method, raw):
            return Decision(False, "denied_by_rule", rule.text)
    for rule in allow:
        if _reference_matches(rule, method, raw):
            return Decision(True, "allowed", rule.text)
    return Decision(False, "no_matching_rule", None)


@settings(DETERMINISTIC, max_examples=600)
@given(any_path_text)
@example("/%2e")
@example("/%2E%2e")
@example("/%2e/a")
@example("/a/%2E/b")
@example("/a/%2e")
@example("/a/.%2e")
@example("/%2f")
@example("/a%5Cb")
@example("/%25")
def test_normalise_path_refuses_or_returns_an_unambiguous_path(raw: str) -> None:
    try:
        path = normalise_path(raw)
    except PathRejected as rejected:
        assert rejected.reason in REJECTION_REASONS
        assert str(rejected) == f"request path refused: {REJECTION_REASONS[rejected.reason]}"
        return
    assert path.raw == raw
    assert raw.isascii() and len(raw) <= MAX_PATH_BYTES
    assert all(segment != "" for segment in path.segments[:-1])
    for segment in path.segments:
        assert segment not in (".", "..")
        assert not {"/", "\\", "%", ";"} & set(segment)
        assert not any(unicodedata.category(char) == "Cc" for char in segment)
        assert unicodedata.normalize("NFKC", segment) == segment
    # An upstream that decodes the forwarded bytes sees exactly the segments the rules were matched against.
    assert unquote(raw, errors="strict").split("/")[1:] == list(path.segments)


ESCAPE_REASONS = {"%2e": "encoded_dot", "%2f": "encoded_slash", "%5c": "backslash", "%25": "double_encoding"}
ACCEPTED_PIECES = ["a", "b", "ab", "x", "A", "aB", "%C3%A9", "%3A", "%20"]


def _with_escape(segments: list[list[str]], escape: str, upper: bool, segment: int, piece: int) -> tuple[str, str]:
    """An accepted path with one escape put into a segment (alone when `piece` is -1), and its refusal reason."""
    target = segments[segment % len(segments)]
    spelled = escape.upper() if upper else escape
    if piece < 0:
        target[:] = [spelled]
    else:
        target.insert(piece % (len(target) + 1), spelled)
    return "/" + "/".join("".join(pieces) for pieces in segments), ESCAPE_REASONS[escape]


escaped_paths = st.builds(
    _with_escape,
    st.lists(st.lists(st.sampled_from(ACCEPTED_PIECES), min_size=1, max_size=3), min_size=1, max_size=4),
    st.sampled_from(sorted(ESCAPE_REASONS)),
    st.booleans(),
    st.integers(0, 7),
    st.integers(-1, 3),
)


@settings(DETERMINISTIC, max_examples=300)
@given(escaped_paths)
@example(("/%2e", "encoded_dot"))
@example(("/%2E", "encoded_dot"))
@example(("/%2e/a", "encoded_dot"))
@example(("/a/%2E/b", "encoded_dot"))
@example(("/a/%2e", "encoded_dot"))
@example(("/%2ea", "encoded_dot"))
@example(("/a%2E", "encoded_dot"))
@example(("/a%2eb/c", "encoded_dot"))
@example(("/%2f", "encoded_slash"))
@example(("/a%2Fb", "encoded_slash"))
@example(("/a/%2f", "encoded_slash"))
@example(("/%5c/a", "backslash"))
@example(("/a%5Cb", "backslash"))
@example(("/%25", "double_encoding"))
@example(("/a/%25", "double_encoding"))
@example(("/%25a/b", "double_encoding"))
def test_an_encoded_dot_slash_backslash_or_percent_anywhere_is_refused_with_its_reason(case: tuple[str, str]) -> None:
    raw, reason = case
    try:
        normalise_path(raw)
    except PathRejected as rejected:
        assert rejected.reason == reason, raw
    else:
        raise AssertionError(f"{raw} was accepted")


@settings(DETERMINISTIC, max_examples=150)  # about three in four tricky paths are refused, so this draws ~600
@given(request_methods, tricky_paths, rule_lists, rule_lists)
def test_decide_agrees_with_a_reference_matcher_on_the_decoded_path(
    method: str, raw: str, allow: list[Rule], deny: list[Rule]
) -> None:
    path = _normalised_or_none(raw)
    assume(path is not None)
    assert path is not None
    assert decide(method, path, allow, deny) == _reference_decide(method, raw, allow, deny)


@settings(DETERMINISTIC, max_examples=400)
@given(request_methods, accepted_paths, rule_lists, rule_lists)
def test_decide_agrees_with_a_reference_matcher_on_accepted_paths(
    method: str, raw: str, allow: list[Rule], deny: list[Rule]
) -> None:
    assert decide(method, normalise_path(raw), allow, deny) == _reference_decide(method, raw, allow, deny)


def _deny_rules_matching(method: str, path: NormalisedPath) -> list[Rule]:
    rules = []
    for text in ["* /**", f"{method} /**", "* /" + "/".join(path.segments)]:
        try:
            rule = parse_rule(text)
        except RuleError:  # a lower-case method, or a decoded space, cannot be spelled in a rule
            continue
        if rule.text == text:  # stripping would have turned a decoded trailing space into another glob
            rules.append(rule)
    return rules


@settings(DETERMINISTIC, max_examples=300)
@given(request_methods, accepted_paths, rule_lists, rule_lists)
def test_a_matching_deny_rule_always_wins(method: str, raw: str, allow: list[Rule], deny: list[Rule]) -> None:
    path = normalise_path(raw)
    allow_all = [*allow, parse_rule("* /**")]
    assert decide(method, path, allow_all, []).allowed is True
    for deny_rule in _deny_rules_matching(method, path):
        decision = decide(method, path, allow_all, [*deny, deny_rule])
        assert decision.allowed is False
        assert decision.reason == "denied_by_rule"


def _lenient_spellings(raw: str) -> list[str]:
    """The path as a case-folding or slash-forgiving upstream would treat as the same: ASCII letters outside
    percent-escapes swapped in case, with and without a trailing slash."""
    swapped = "".join(
        piece if piece.startswith("%") else piece.swapcase()
        for piece in re.split(r"(%[0-9A-Fa-f]{2})", raw)
    )
    spellings = [swapped]
    if raw != "/":
        spellings += [raw + "/" if not raw.endswith("/") else raw[:-1] + "/", swapped + "/"]
    return [spelling for spelling in spellings if "//" not in spelling and _normalised_or_none(spelling)]


@settings(DETERMINISTIC, max_examples=300)
@given(request_methods, accepted_paths, rule_lists, rule_lists)
def test_a_deny_rule_also_catches_case_and_trailing_slash_spellings(
    method: str, raw: str, allow: list[Rule], deny: list[Rule]
) -> None:
    path = normalise_path(raw)
    allow_all = [*allow, parse_rule("* /**")]
    for deny_rule in _deny_rules_matching(method, path):
        for spelling in _lenient_spellings(raw):
            decision = decide(method, normalise_path(spelling), allow_all, [*deny, deny_rule])
            assert decision.allowed is False, (deny_rule.text, spelling)


@settings(DETERMINISTIC, max_examples=300)
@given(st.text(max_size=20), st.one_of(accepted_paths, tricky_paths), rule_lists, rule_lists)
def test_decide_never_raises_for_any_method(
    method: str, raw: str, allow: list[Rule], deny: list[Rule]
) -> None:
    path = _normalised_or_none(raw)
    assume(path is not None)
    assert path is not None
    decision = decide(method, path, allow, deny)
    is_token = bool(method) and all(char in TOKEN_CHARS for char in method)
    if not is_token:
        assert decision == Decision(False, "bad_method", None)
    else:
        assert decision.reason in ("allowed", "denied_by_rule", "no_matching_rule")
        assert decision.allowed is (decision.reason == "allowed")
        assert (decision.rule is None) is (decision.reason == "no_matching_rule")


@settings(DETERMINISTIC, max_examples=300)
@given(st.text(max_size=40))
def test_parse_rule_either_raises_rule_error_or_round_trips(text: str) -> None:
    try:
        rule = parse_rule(text)
    except RuleError as error:
        assert str(error)
        return
    assert rule.text == text.strip()
    assert f"{rule.method} /" + "/".join(rule.segments) == rule.text
