"""Policy for broker requests: parse rule strings, refuse ambiguous request paths, decide allow or deny.

Pure and free of I/O, so every decision can be tested exhaustively and audited before anything goes upstream.
"""

from __future__ import annotations

import difflib
import re
import string
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

MAX_PATH_BYTES: Final = 4096

# Machine code -> human message. The message never includes the path: it came from the child and may be
# hostile (terminal escapes, log injection), so only the code and this fixed text reach logs and audit.
REJECTION_REASONS: Final[Mapping[str, str]] = {
    "not_absolute": "the path must start with '/'",
    "path_too_long": f"the path is longer than {MAX_PATH_BYTES} bytes",
    "fragment": "the path contains '#': a fragment is never part of a request",
    "query": "the path contains '?': the query must be split off before the path is checked",
    "backslash": "the path contains a backslash (raw or as %5C), which some servers treat as '/'",
    "path_parameter": "the path contains ';' (raw or as %3B): servers that strip path parameters "
    "would act on a different path than the one the rules saw",
    "control_char": "the path contains a control character (raw or percent-encoded)",
    "non_ascii": "the path contains a raw non-ASCII character: percent-encode it as UTF-8",
    "forbidden_char": "the path contains a character that RFC 3986 requires to be percent-encoded",
    "bad_percent_encoding": "the path contains '%' not followed by two hex digits",
    "encoded_slash": "the path contains %2F, an encoded '/', which servers split in different ways",
    "encoded_dot": "the path contains %2E, an encoded '.', a way to hide dot segments",
    "double_encoding": "the path contains %25, an encoded '%', a way to survive a second round of decoding",
    "encoded_unreserved": "the path percent-encodes a letter, digit, '-', '_' or '~', "
    "which a normal client never does and which would dodge literal rules",
    "invalid_utf8": "the path's percent-encoded bytes are not valid UTF-8",
    "ambiguous_unicode": "the path decodes to Unicode that NFKC normalisation would change, "
    "so a server might fold it into other characters (such as '/' or '.')",
    "empty_segment": "the path contains an empty segment ('//')",
    "dot_segment": "the path contains a '.' or '..' segment",
}

_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar plus "/", minus ";" (path parameters). "%" is allowed here and checked escape by escape.
_FIRST_BAD_RAW_CHAR: Final = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,=:@/%]")
_RAW_CHAR_REASONS: Final[Mapping[str, str]] = {
    "#": "fragment",
    "?": "query",
    "\\": "backslash",
    ";": "path_parameter",
}
_PERCENT_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})?")
_ESCAPED_BYTE_REASONS: Final[Mapping[int, str]] = {
    0x2F: "encoded_slash",
    0x5C: "backslash",
    0x2E: "encoded_dot",
    0x25: "double_encoding",
    0x3B: "path_parameter",
}

# RFC 7230 token: what a request method may be at all.
_METHOD_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Rules are stricter than the wire, so a typo cannot produce a method no client ever sends: a rule names one of
# these, `*`, or a custom verb its credential declares in `custom_methods` (WebDAV's PROPFIND, SSDP's M-SEARCH).
STANDARD_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
_RULE_METHOD: Final = re.compile(r"[A-Z_\-]+")
_RULE_EXAMPLE: Final = "e.g. 'GET /v1/items/*'"
_TEMPLATE_CHARS: Final = frozenset("{}<>")


class RuleError(ValueError):
    """A rule string cannot be trusted to mean what its author intended, so the profile is refused."""


@dataclass(frozen=True)
class Rule:
    """One parsed `METHOD PATH-GLOB` rule; `text` is kept so decisions can name the rule as written."""

    text: str
    method: str
    segments: tuple[str, ...]


class PathRejected(Exception):
    """A request path that an upstream could read differently from the policy, so it never goes out."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request path refused: {REJECTION_REASONS[reason]}")
        self.reason = reason


@dataclass(frozen=True)
class NormalisedPath:
    """A path the policy and the upstream are bound to read alike.

    `raw` is what goes upstream byte for byte; `segments` are the decoded forms the rules match against.
    """

    raw: str
    segments: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """The verdict plus what the audit needs to explain it."""

    allowed: bool
    reason: str
    rule: str | None


def parse_rule(text: str, custom_methods: Collection[str] = ()) -> Rule:
    """Parse strictly, because a rule that silently means something else is a hole in the policy.

    A misspelt method (`DELET`) would match nothing and block silently, so methods outside STANDARD_METHODS are
    refused unless listed in `custom_methods`.
    """
    stripped = text.strip()
    if not stripped:
        raise RuleError(f"the rule is empty: write a method and a path glob, {_RULE_EXAMPLE}")
    parts = stripped.split(" ")
    if len(parts) != 2 or not all(parts):
        raise RuleError(f"a rule is a method and a path glob separated by exactly one space, {_RULE_EXAMPLE}")
    method, path = parts
    _check_rule_method(method, path, custom_methods)
    return Rule(text=stripped, method=method, segments=_parse_rule_path(path))


def _check_rule_method(method: str, path: str, custom_methods: Collection[str]) -> None:
    if method == "*" or method in STANDARD_METHODS or method in custom_methods:
        return
    if method.startswith("/"):
        raise RuleError(
            f"the method comes first, then the path: write '{path} {method}', not '{method} {path}'"
        )
    if method.upper() in (*STANDARD_METHODS, *custom_methods):
        raise RuleError(f"methods are matched case-sensitively: write {method.upper()}, not {method}")
    if not _RULE_METHOD.fullmatch(method.upper()):
        raise RuleError(
            f"method {method!r} is not valid: use an upper-case HTTP method such as GET or POST, or * for any"
        )
    close = difflib.get_close_matches(method.upper(), STANDARD_METHODS, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]}? " if close else ""
    raise RuleError(
        f"{method!r} is not a standard HTTP method ({', '.join(STANDARD_METHODS)} or * for any); {guess}"
        f"for a custom verb, list it in this credential's custom_methods, e.g. custom_methods = [\"{method}\"]"
    )


def _parse_rule_path(path: str) -> tuple[str, ...]:
    if not path.startswith("/"):
        raise RuleError(f"the path glob {path!r} must start with '/'")
    if "?" in path:
        raise RuleError("a rule cannot contain '?': rules match the path only, never the query")
    if "#" in path:
        raise RuleError("a rule cannot contain '#': fragments are never sent to a server")
    if "%" in path:
        raise RuleError(
            "a rule cannot contain '%': write the path decoded, since rules match decoded segments; "
            "use '*' for a segment that needs encoding"
        )
    if "\\" in path:
        raise RuleError("a rule cannot contain a backslash: separate segments with '/'")
    if ";" in path:
        raise RuleError("a rule cannot contain ';': requests with path parameters are always refused")
    segments = tuple(path[1:].split("/"))
    for index, segment in enumerate(segments):
        _check_rule_segment(segment, is_last=index == len(segments) - 1)
    return segments


def _check_rule_segment(segment: str, *, is_last: bool) -> None:
    if segment == "" and not is_last:
        raise RuleError("the path glob has an empty segment ('//'): remove the extra '/'")
    if segment in (".", ".."):
        raise RuleError(
            f"the path glob has a {segment!r} segment: requests with dot segments are always refused, "
            "so write the path without it"
        )
    if "*" in segment and segment not in ("*", "**"):
        raise RuleError(
            f"segment {segment!r} mixes '*' with other characters: a glob segment is exactly "
            "'*' (one segment) or '**' (any number of segments)"
        )
    if _TEMPLATE_CHARS.intersection(segment):
        raise RuleError(
            f"segment {segment!r} looks like a URL template placeholder, but rules are literal: "
            "use '*' for one segment or '**' for any number"
        )
    if any(unicodedata.category(char) == "Cc" for char in segment):
        raise RuleError(f"segment {segment!r} contains a control character; remove it")
    if unicodedata.normalize("NFKC", segment) != segment:
        raise RuleError(
            f"segment {segment!r} is not in Unicode NFKC form, so no accepted request can match it: "
            f"write {unicodedata.normalize('NFKC', segment)!r}"
        )


def normalise_path(raw: str) -> NormalisedPath:
    """Refuse, never clean: a cleaned path is one the upstream may still read the other way."""
    if not raw.startswith("/"):
        raise PathRejected("not_absolute")
    if len(raw) > MAX_PATH_BYTES:  # any non-ASCII is refused below, so characters are bytes here
        raise PathRejected("path_too_long")
    bad_char = _FIRST_BAD_RAW_CHAR.search(raw)
    if bad_char:
        raise PathRejected(_raw_char_reason(bad_char.group()))
    for escape in _PERCENT_ESCAPE.finditer(raw):
        reason = _escaped_byte_reason(escape.group(1))
        if reason:
            raise PathRejected(reason)
    raw_segments = raw[1:].split("/")
    for index, segment in enumerate(raw_segments):
        if segment == "" and index != len(raw_segments) - 1:
            raise PathRejected("empty_segment")
        if segment in (".", ".."):
            raise PathRejected("dot_segment")
    return NormalisedPath(raw=raw, segments=tuple(_decode_segment(segment) for segment in raw_segments))


def _raw_char_reason(char: str) -> str:
    if char in _RAW_CHAR_REASONS:
        return _RAW_CHAR_REASONS[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return "control_char"
    if ord(char) > 0x7F:
        return "non_ascii"
    return "forbidden_char"


def _escaped_byte_reason(hex_digits: str | None) -> str | None:
    if hex_digits is None:
        return "bad_percent_encoding"
    byte = int(hex_digits, 16)
    if byte in _ESCAPED_BYTE_REASONS:
        return _ESCAPED_BYTE_REASONS[byte]
    if byte < 0x20 or byte == 0x7F:
        return "control_char"
    if chr(byte) in _UNRESERVED:
        return "encoded_unreserved"
    return None


def _decode_segment(segment: str) -> str:
    if "%" not in segment:
        return segment
    try:
        decoded = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise PathRejected("invalid_utf8") from None
    if decoded.isascii():
        return decoded
    # C1 controls (U+0080-U+009F) arrive as valid UTF-8, so the byte checks above cannot see them.
    if any(unicodedata.category(char) == "Cc" for char in decoded):
        raise PathRejected("control_char")
    if unicodedata.normalize("NFKC", decoded) != decoded:
        raise PathRejected("ambiguous_unicode")
    return decoded


def decide(method: str, path: NormalisedPath, allow: Sequence[Rule], deny: Sequence[Rule]) -> Decision:
    """Deny wins and no match is deny, so a forgotten rule can only ever block, never expose.

    Deny rules also match the path as a lenient upstream may read it (see `_deny_matches`); allow rules stay
    exact. Leniency can therefore only block more, never expose more.
    """
    if not _METHOD_TOKEN.fullmatch(method):
        return Decision(allowed=False, reason="bad_method", rule=None)
    for rule in deny:
        if _deny_matches(rule, method, path):
            return Decision(allowed=False, reason="denied_by_rule", rule=rule.text)
    for rule in allow:
        if _matches(rule, method, path):
            return Decision(allowed=True, reason="allowed", rule=rule.text)
    return Decision(allowed=False, reason="no_matching_rule", rule=None)


def _matches(rule: Rule, method: str, path: NormalisedPath) -> bool:
    return rule.method in ("*", method) and match_glob(rule.segments, path.segments)


def _deny_matches(rule: Rule, method: str, path: NormalisedPath) -> bool:
    """Exact match, or match ignoring ASCII case and one trailing slash.

    Many servers route "/a/merge/" to "/a/merge" (Express, Spring) and "/A/MERGE" to "/a/merge" (ASP.NET,
    IIS); a deny rule carved out of a wider allow must not be dodged by such a spelling.
    """
    if _matches(rule, method, path):
        return True
    if rule.method not in ("*", method):
        return False
    return match_glob(_folded(rule.segments), _folded(path.segments))


def _folded(segments: tuple[str, ...]) -> tuple[str, ...]:
    """Lower case, without a trailing empty segment (the root "/" keeps its one)."""
    if len(segments) > 1 and segments[-1] == "":
        segments = segments[:-1]
    return tuple(segment.lower() for segment in segments)


def match_glob(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """Track the set of reachable pattern positions, so even many '**' cost only O(pattern * path)."""
    states = _skip_double_stars(pattern, {0})
    for segment in segments:
        advanced: set[int] = set()
        for position in states:
            if position == len(pattern):
                continue
            element = pattern[position]
            if element == "**":
                advanced.add(position)
            elif element == segment or (element == "*" and segment != ""):
                advanced.add(position + 1)
        if not advanced:
            return False
        states = _skip_double_stars(pattern, advanced)
    return len(pattern) in states


def _skip_double_stars(pattern: tuple[str, ...], positions: set[int]) -> set[int]:
    """'**' may match zero segments, so reaching one also reaches whatever follows it."""
    reachable = set(positions)
    for position in positions:
        while position < len(pattern) and pattern[position] == "**":
            position += 1
            reachable.add(position)
    return reachable
