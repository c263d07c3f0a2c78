"""Reasoning about rules as sets of requests: does one rule match everything another one matches?"""

from __future__ import annotations

from functools import cache

from outloop_cli.policy import Rule


def covers(outer: Rule, inner: Rule) -> bool:
    """True when every request `inner` matches, `outer` matches too (methods and path globs)."""
    if outer.method != "*" and outer.method != inner.method:
        return False
    return _covers(outer.segments, inner.segments)


def _covers(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    @cache
    def at(i: int, j: int) -> bool:
        if i == len(outer):
            return j == len(inner)
        if outer[i] == "**":
            # '**' takes none of inner's elements, or one more (any element, '*' and '**' included).
            return at(i + 1, j) or (j < len(inner) and at(i, j + 1))
        if j == len(inner):
            return False
        if inner[j] == "**":
            return False  # only an outer '**' covers an inner '**'
        if outer[i] == "*":
            return inner[j] != "" and at(i + 1, j + 1)
        return outer[i] == inner[j] and at(i + 1, j + 1)

    return at(0, 0)
