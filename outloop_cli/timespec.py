"""Turn the operator's `--since` / `--until` / `--older-than` words into epoch seconds.

Kept apart from units.py because it depends on "now" and the local time zone, which durations never do.
"""

from __future__ import annotations

import time
from datetime import datetime

from outloop_cli.errors import UsageError
from outloop_cli.units import parse_duration

FORMS = "a duration back from now (\"90m\", \"24h\", \"7d\") or a date/time (\"2025-01-31\", \"2025-01-31T18:00\")"


def parse_point(option: str, text: str, *, now: float | None = None) -> float:
    """Epoch seconds for "7d" (seven days ago) or an ISO date/time (local time unless it carries an offset)."""
    moment = time.time() if now is None else now
    try:
        return moment - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a time; write {FORMS}") from None


def parse_age(option: str, text: str, *, now: float | None = None) -> float:
    """Epoch seconds `text` ago, for `--older-than 90d`; only durations make sense there."""
    try:
        return (time.time() if now is None else now) - parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def format_time(epoch: float | None) -> str:
    """Local time as operators read it in a listing."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def iso_time(epoch: float | None) -> str | None:
    """ISO 8601 with offset, for JSON and exports that leave this machine."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="milliseconds")
