"""The wrong-client guard's identifiers: which other clients' data a run must never carry, and one matcher for all.

A run for acme refuses requests carrying an identifier that another workspace declared in `[guard]`, so a loop
that mixes up its clients cannot write globex's data into acme's account with acme's perfectly valid key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ahocorasick_rs

from outloop_cli.profiles import GuardSettings, Profile, available_workspaces, read_guard_identifiers


@dataclass(frozen=True)
class Identifier:
    """One declared identifier; `rule` is how the audit names it, since the text itself is client data."""

    workspace: str
    index: int
    text: str

    @property
    def rule(self) -> str:
        return f"{self.workspace}: guard.identifiers[{self.index}]"


class Guard:
    """Finds any of many literal identifiers in text, ignoring case, in one pass (Aho-Corasick, as a DFA).

    With hundreds of identifiers a regex alternation or a loop of `in` tests costs time per identifier for every
    request; the automaton's cost grows with the text only. ahocorasick-rs was measured against pyahocorasick
    and the alternatives (docs/CHOICES.md, docs/BENCHMARKS.md).
    """

    def __init__(self, identifiers: Sequence[Identifier], settings: GuardSettings) -> None:
        self.settings = settings
        self.identifiers = tuple(identifiers)
        # The same text declared twice: the first declaration names it.
        first: dict[str, Identifier] = {}
        for item in identifiers:
            first.setdefault(fold(item.text), item)
        self._named = list(first.values())
        self.longest = max((len(key) for key in first), default=0)
        self._automaton = ahocorasick_rs.AhoCorasick(list(first), implementation=ahocorasick_rs.Implementation.DFA)

    def find(self, text: str) -> Identifier | None:
        """The first identifier in `text`, or None; `text` must already be folded with `fold`."""
        matches = self._automaton.find_matches_as_indexes(text)
        return self._named[matches[0][0]] if matches else None

    def search(self, texts: Iterable[str]) -> Identifier | None:
        for text in texts:
            found = self.find(fold(text))
            if found is not None:
                return found
        return None


def fold(text: str) -> str:
    """Case-insensitive matching: both the identifiers and the scanned text go through this."""
    return text.lower()


def declared_identifiers(dirs: Sequence[Path]) -> dict[str, list[Identifier]]:
    """Every workspace's own identifiers along the profile path (ProfileError for an unreadable `[guard]`)."""
    declared: dict[str, list[Identifier]] = {}
    for name, path in available_workspaces(dirs).items():
        texts = read_guard_identifiers(path)
        if texts:
            declared[name] = [Identifier(name, index, text) for index, text in enumerate(texts)]
    return declared


def load_guard(profile: Profile, dirs: Sequence[Path]) -> Guard | None:
    """The guard for a run of `profile`: other workspaces' identifiers, or None when nobody declared any.

    Workspaces this profile extends are not "other": a base profile's data is shared by design. An identifier the
    run's own workspace also declares is not foreign either (`workspace check` warns about such overlaps).
    """
    own_chain = {path.stem for path in profile.sources}
    declared = declared_identifiers(dirs)
    own = {fold(item.text) for name in own_chain for item in declared.get(name, ())}
    foreign = [item for name, items in sorted(declared.items()) if name not in own_chain
               for item in items if fold(item.text) not in own]
    return Guard(foreign, profile.guard) if foreign else None


@dataclass(frozen=True)
class Overlap:
    first: Identifier
    second: Identifier


def overlapping_identifiers(declared: Mapping[str, Sequence[Identifier]]) -> list[Overlap]:
    """Pairs from different workspaces where one identifier contains the other (ignoring case): a run of either
    workspace would refuse its own client's data."""
    items = [item for name in sorted(declared) for item in declared[name]]
    overlaps = []
    for position, first in enumerate(items):
        for second in items[position + 1:]:
            if first.workspace == second.workspace:
                continue
            a, b = fold(first.text), fold(second.text)
            if a in b or b in a:
                overlaps.append(Overlap(first, second))
    return overlaps
