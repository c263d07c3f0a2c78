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
    in a blank line) pass through without delay. The tail is judged on the raw bytes: masking a short variant
    first could hide the start of a longer one that the next chunk completes.
    """

    def __init__(self, variants: tuple[bytes, ...]) -> None:
        self._variants = variants
        self._pending = b""  # raw bytes held back
        self._pending_covered = 0  # leading bytes of _pending that an already-emitted match covers
        self._first_bytes = frozenset(v[0] for v in variants)
        self._longest = max((len(v) for v in variants), default=0)
        self.masked = 0

    def feed(self, chunk: bytes) -> bytes:
        if not self._variants:
            return chunk
        data = self._pending + chunk
        cut = len(data) - self._risky_tail(data)
        spans = _matches(data, self._variants)
        emitted = [(0, self._pending_covered)]
        emitted += [(start, end) for start, end in spans if start < cut]  # the rest are found again next time
        self.masked += len(emitted) - 1
        self._pending, self._pending_covered = data[cut:], max(0, max(end for _, end in emitted) - cut)
        return _mask(data, emitted)[:cut]

    def flush(self) -> bytes:
        data, covered = self._pending, self._pending_covered
        self._pending, self._pending_covered = b"", 0
        spans = _matches(data, self._variants)
        self.masked += len(spans)
        return _mask(data, [(0, covered), *spans])

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


def _matches(data: bytes, variants: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """Every occurrence of every variant, overlapping ones included, as (start, end)."""
    spans = []
    for variant in variants:
        start = data.find(variant)
        while start != -1:
            spans.append((start, start + len(variant)))
            start = data.find(variant, start + 1)
    return spans


def _mask(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """`data` with every byte that some span covers replaced by `*`, so overlapping secrets are masked whole."""
    if not any(end > start for start, end in spans):
        return data
    out = bytearray(data)
    for start, end in spans:
        out[start:end] = b"*" * len(out[start:end])
    return bytes(out)


def redact_text(text: str, variants: tuple[bytes, ...]) -> str:
    """Mask secrets in a header value (headers are small, no streaming state needed)."""
    data = text.encode("utf-8", "surrogateescape")
    return _mask(data, _matches(data, variants)).decode("utf-8", "surrogateescape")
