"""Mask secret values that an upstream echoes back, in headers and across streamed body chunks.

Masks keep the byte length (`*` for each byte) so a Content-Length the upstream sent stays true.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from urllib.parse import quote


def secret_variants(values: Iterable[str]) -> tuple[bytes, ...]:
    """Every form in which a secret may come back: raw, URL-encoded, JSON-escaped, base64."""
    variants: set[bytes] = set()
    for value in values:
        if not value:
            continue
        raw = value.encode("utf-8")
        variants.update({
            raw,
            quote(value, safe="").encode("ascii"),
            json.dumps(value)[1:-1].encode("utf-8"),
            base64.b64encode(raw),
            base64.urlsafe_b64encode(raw),
        })
    # Longest first, so a variant that contains another is masked whole.
    return tuple(sorted(variants, key=len, reverse=True))


def basic_auth_variant(user: str, secret: str) -> str:
    return base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")


class StreamRedactor:
    """Stateful masker for one response body.

    It holds back only a tail that could be the start of a secret, so ordinary streams (SSE events ending
    in a blank line) pass through without delay.
    """

    def __init__(self, variants: tuple[bytes, ...]) -> None:
        self._variants = variants
        self._pending = b""
        self._first_bytes = frozenset(v[0] for v in variants)
        self._longest = max((len(v) for v in variants), default=0)
        self.masked = 0

    def feed(self, chunk: bytes) -> bytes:
        if not self._variants:
            return chunk
        data = self._mask(self._pending + chunk)
        keep = self._risky_tail(data)
        self._pending = data[len(data) - keep:] if keep else b""
        return data[: len(data) - keep]

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _mask(self, data: bytes) -> bytes:
        for variant in self._variants:
            if variant in data:
                self.masked += data.count(variant)
                data = data.replace(variant, b"*" * len(variant))
        return data

    def _risky_tail(self, data: bytes) -> int:
        """Length of the longest suffix of `data` that is a proper prefix of some secret variant."""
        window = min(len(data), self._longest - 1)
        start = len(data) - window
        for position in range(start, len(data)):
            if data[position] not in self._first_bytes:
                continue
            tail = data[position:]
            if any(v.startswith(tail) for v in self._variants):
                return len(tail)
        return 0


def redact_text(text: str, variants: tuple[bytes, ...]) -> str:
    """Mask secrets in a header value (headers are small, no streaming state needed)."""
    data = text.encode("utf-8", "surrogateescape")
    for variant in variants:
        data = data.replace(variant, b"*" * len(variant))
    return data.decode("utf-8", "surrogateescape")
