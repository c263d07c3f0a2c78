"""The chain format: how an event's columns are normalised and hashed, so writer and verifier agree.

Everything that decides an event's stored spelling or its hash lives here: there is one chain format.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Final

from outloop_cli.errors import AuditError

GENESIS_HASH: Final = "0" * 64
# Every stored event column except ``hash``, which covers them all. The order is the SELECT order.
EVENT_COLUMNS: Final = (
    "run_id", "seq", "ts", "kind", "workspace", "credential", "method", "host", "path", "decision",
    "reason", "rule", "status", "latency_ms", "bytes_in", "bytes_out", "request_seq", "error", "detail",
    "prev_hash",
)  # fmt: skip
_TEXT_COLUMNS: Final = frozenset({"credential", "method", "host", "path", "decision", "reason", "rule", "error"})
_INT_COLUMNS: Final = frozenset({"status", "bytes_in", "bytes_out", "request_seq"})
_REAL_COLUMNS: Final = frozenset({"latency_ms"})
COLUMN_KEYWORDS: Final = _TEXT_COLUMNS | _INT_COLUMNS | _REAL_COLUMNS


def is_error(status: object, error: object) -> bool:
    """Whether an allowed request's outcome failed: an upstream 4xx/5xx, or the broker's own 502/504/499.

    error_sql is the same test in SQL, for the migration's backfill and the `--failed` filters.
    """
    return error is not None or (isinstance(status, int) and status >= 400)


def error_sql(table: str = "") -> str:
    return f"({table}error IS NOT NULL OR {table}status >= 400)"


# Built once: json.dumps with these options builds a new encoder per call, which cost more than the encoding
# (two or three encodings per brokered request, on the audit writer's path).
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_json(value: object) -> str:
    """One spelling per value, so a hash recomputed from what SQLite hands back matches the original."""
    return _CANONICAL.encode(value)


def event_hash(fields: Mapping[str, object]) -> str:
    """Hash of one event; NULL columns are left out so a migration adding a column keeps old chains valid.

    Raises TypeError or ValueError for values no writer could have stored (a tampered BLOB, infinity).
    """
    body = {name: value for name, value in fields.items() if name != "hash" and value is not None}
    return hashlib.sha256((str(fields["prev_hash"]) + canonical_json(body)).encode()).hexdigest()


def now() -> float:
    # Microseconds are plenty for ordering, and keep the hashed float repr short.
    return round(time.time(), 6)


def text_value(value: str) -> str:
    # A lone surrogate (from a surrogateescape-decoded path) cannot be stored as UTF-8 TEXT; escape it
    # rather than refuse the request over its audit spelling.
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _path_without_query_values(path: str) -> str:
    # The broker should never hand us a query string, but query values may be secrets: keep names only.
    base, _, query = path.partition("#")[0].partition("?")
    if not query:
        return base
    return base + "?" + "&".join(part.partition("=")[0] for part in query.split("&") if part)


def json_object(value: Mapping[str, object], what: str) -> dict[str, object]:
    """A plain-JSON copy of a caller's detail, so a bad value fails in the caller, not the writer."""
    try:
        loaded = json.loads(canonical_json(dict(value)))
    except (TypeError, ValueError) as exc:
        raise AuditError(f"{what} is not JSON-serialisable ({type(exc).__name__})") from None
    assert isinstance(loaded, dict)
    return loaded


def check_decision(decision: object) -> None:
    if decision not in ("allow", "deny"):
        raise ValueError("decision must be 'allow' or 'deny'")


def column_value(name: str, value: object) -> object:
    """The Python value SQLite will hand back for this column, so writer and verifier hash the same thing."""
    if value is None:
        return None
    if name in _TEXT_COLUMNS:
        if not isinstance(value, str):
            raise TypeError(f"audit field {name} must be a string")
        return _path_without_query_values(text_value(value)) if name == "path" else text_value(value)
    if name in _INT_COLUMNS:
        if not isinstance(value, int):
            raise TypeError(f"audit field {name} must be an integer")
        return int(value)  # a bool would come back from SQLite as 0/1
    if name in _REAL_COLUMNS:
        if not isinstance(value, int | float):
            raise TypeError(f"audit field {name} must be a number")
        number = float(value) + 0.0  # -0.0 + 0.0 is 0.0: SQLite hands -0.0 back as 0.0
        return number if math.isfinite(number) else None  # SQLite would turn NaN into NULL anyway
    raise TypeError(f"unknown audit field {name}")
