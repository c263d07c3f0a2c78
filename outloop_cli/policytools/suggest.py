"""`outloop policy suggest`: allow rules drafted from the audit's `no_matching_rule` denials.

Variable segments become `*`: numbers, UUIDs, long hex, and segments that take different id-like values at the
same place in otherwise equal paths. A rule a deny rule would override is never suggested: deny wins, so it would
only look like a fix.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from outloop_cli.audit.store import EventRow, iter_events, run_events
from outloop_cli.policy import PathRejected, RuleError, decide, normalise_path, parse_rule
from outloop_cli.policytools.globs import covers
from outloop_cli.profiles import Profile

NO_RULE = "no_matching_rule"
_NUMBER = re.compile(r"\d+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_LONG_HEX = re.compile(r"(?=.*\d)[0-9a-fA-F]{12,}")
_ID_LIKE_LENGTH = 16
_EXAMPLES = 3


@dataclass
class Suggestion:
    credential: str
    rule: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    credential: str
    request: str
    why: str


@dataclass
class Suggestions:
    considered: int
    rules: list[Suggestion]
    skipped: list[Skipped]


def denied_requests(conn: sqlite3.Connection, workspace: str, *, run_id: str | None = None,
                    since: float | None = None) -> list[EventRow]:
    """The workspace's requests refused because no rule matched, from one run or since a time."""
    if run_id is not None:
        events: Iterable[EventRow] = run_events(conn, run_id)
    else:
        events = iter_events(conn, workspace=workspace, since=since)
    return [event for event in events if event.kind == "request" and event.reason == NO_RULE
            and event.workspace == workspace and event.credential and event.method and event.path]


def is_variable(segment: str) -> bool:
    return any(pattern.fullmatch(segment) for pattern in (_NUMBER, _UUID, _LONG_HEX))


def _id_like(segment: str) -> bool:
    return any(char.isdigit() for char in segment) or len(segment) >= _ID_LIKE_LENGTH


def generalise(paths: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Each path's shape: variable segments as '*', then id-like segments that vary where the rest agrees."""
    shapes = [tuple("*" if is_variable(segment) else segment for segment in path) for path in paths]
    for position in range(max((len(shape) for shape in shapes), default=0)):
        groups: dict[tuple[object, ...], set[str]] = {}
        for shape in shapes:
            if position < len(shape):
                groups.setdefault((len(shape), shape[:position], shape[position + 1:]), set()).add(shape[position])
        varying = {key for key, values in groups.items()
                   if len(values) > 1 and all(value == "*" or _id_like(value) for value in values)}
        shapes = [(*shape[:position], "*", *shape[position + 1:])
                  if position < len(shape) and (len(shape), shape[:position], shape[position + 1:]) in varying
                  else shape for shape in shapes]
    return shapes


def suggest(profile: Profile, denials: Sequence[EventRow]) -> Suggestions:
    found: dict[tuple[str, str], Suggestion] = {}
    skipped: list[Skipped] = []
    by_key: dict[tuple[str, str], list[tuple[str, tuple[str, ...]]]] = {}
    for event in denials:
        assert event.credential and event.method and event.path
        credential = profile.credentials.get(event.credential)
        request = f"{event.method} {event.path}"
        if credential is None:
            skipped.append(Skipped(event.credential, request, "the credential is no longer in the profile"))
            continue
        try:
            path = normalise_path(event.path)
        except PathRejected:
            skipped.append(Skipped(event.credential, request, "the recorded path is cut short or not a plain path"))
            continue
        now = decide(event.method, path, credential.allow, credential.deny)
        if now.allowed:
            skipped.append(Skipped(event.credential, request, f"already allowed now, by {now.rule!r}"))
        elif now.reason == "denied_by_rule":
            skipped.append(Skipped(event.credential, request, f"deny rule {now.rule!r} matches it: deny wins"))
        else:
            by_key.setdefault((event.credential, event.method), []).append((event.path, path.segments))
    for (name, method), requests in sorted(by_key.items()):
        deny = profile.credentials[name].deny
        for (raw, _segments), shape in zip(requests, generalise([segments for _, segments in requests]),
                                           strict=True):
            text = _rule_text(method, shape)
            if text is None:
                skipped.append(Skipped(name, f"{method} {raw}", "cannot be written as a rule"))
                continue
            rule = parse_rule(text)
            overriding = next((d.text for d in deny if covers(d, rule)), None)
            if overriding is not None:
                skipped.append(Skipped(name, f"{method} {raw}", f"{text!r} would be overridden by deny rule "
                                       f"{overriding!r}"))
                continue
            suggestion = found.setdefault((name, text), Suggestion(name, text))
            suggestion.count += 1
            if raw not in suggestion.examples and len(suggestion.examples) < _EXAMPLES:
                suggestion.examples.append(raw)
    return Suggestions(len(denials), list(found.values()), skipped)


def _rule_text(method: str, shape: tuple[str, ...]) -> str | None:
    """A segment a rule cannot spell (it needs percent-encoding, or holds a glob character) becomes '*'."""
    segments = [segment if _spellable(segment) else "*" for segment in shape]
    text = f"{method} /{'/'.join(segments)}"
    try:
        parse_rule(text)
    except RuleError:
        return None
    return text


def _spellable(segment: str) -> bool:
    if segment in ("*", ""):
        return True
    try:
        rule = parse_rule(f"GET /{segment}")
    except RuleError:
        return False
    return rule.segments == (segment,) and normalise_path("/" + segment).segments == (segment,)


def render_toml(suggestions: Suggestions, header: str) -> str:
    lines = [f"# {header}"]
    current = None
    for suggestion in sorted(suggestions.rules, key=lambda s: (s.credential, s.rule)):
        if suggestion.credential != current:
            if current is not None:
                lines.append("]")
            lines += ["", f"[credentials.{suggestion.credential}]", "allow = ["]
            current = suggestion.credential
        lines.append(f"    {json.dumps(suggestion.rule)},  # {suggestion.count} denied, e.g. "
                     + ", ".join(suggestion.examples))
    if current is not None:
        lines.append("]")
    return "\n".join(lines) + "\n"
