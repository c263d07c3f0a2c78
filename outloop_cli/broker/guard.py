"""The wrong-client guard in the broker: what of a request and a response is scanned, and how.

A loop mixing up clients usually moves data, not credentials: globex's lead in the body of a POST to acme's CRM.
So the path, the query and the held-back body are scanned, in the spellings a server would read them in (percent-
and form-decoded, JSON escapes resolved). This catches mistakes and casual evasion, not a loop that encodes data
on purpose (base64, compression inside a field); docs/CHOICES.md says so.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from collections.abc import AsyncIterator
from urllib.parse import unquote, unquote_plus

from outloop_cli.guard import Guard, Identifier, fold
from outloop_cli.policy import NormalisedPath

GUARD_REASON = "foreign_identifier"
FLAG_REASON = "foreign_identifier_flagged"
TOO_LARGE_REASON = "guard_body_too_large"
UNREADABLE_REASON = "guard_body_unreadable"
MASK = "[guarded]"


def request_texts(path: NormalisedPath, raw_query: str) -> list[str]:
    """The path as the rules see it (decoded segments) and the query raw, percent- and form-decoded."""
    texts = ["/".join(path.segments)]
    if raw_query:
        texts += [raw_query, unquote(raw_query), unquote_plus(raw_query)]
    return texts


def body_texts(body: bytes) -> list[str]:
    """The body as text, plus its form-decoded and (for JSON) escape-resolved spellings."""
    text = body.decode("utf-8", "replace")
    texts = [text]
    if "%" in text or "+" in text:
        texts.append(unquote_plus(text))
    if "\\" in text and text.lstrip()[:1] in ("{", "[", '"'):
        with contextlib.suppress(ValueError):  # not JSON after all: the raw text was scanned
            texts.append(json.dumps(json.loads(text), ensure_ascii=False))
    return texts


def masked_path(path: NormalisedPath, guard: Guard) -> str:
    """The path for the audit with every segment that carries an identifier masked: the audit never holds the
    matched data."""
    raw = path.raw.split("/")
    return "/".join(MASK if index and guard.find(fold(segment)) else raw[index]
                    for index, segment in enumerate(("", *path.segments)))


async def held_body(chunks: AsyncIterator[bytes], limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (the rest is never read)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


class StreamScanner:
    """Scans a response as it streams to the child, carrying a tail across chunks so no match is split."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._tail = ""
        self.found: Identifier | None = None

    def feed(self, chunk: bytes) -> None:
        if self.found is not None:
            return
        text = self._tail + fold(self._decoder.decode(chunk))
        self.found = self._guard.find(text)
        keep = self._guard.longest - 1
        self._tail = text[-keep:] if keep > 0 else ""
