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
    """Local time with its zone, as operators read it in a header or a message."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def compact_time(epoch: float | None, *, seconds: bool = False) -> str:
    """Local time to the minute (or second) for a listing column; the zone goes in the column's header."""
    if epoch is None:
        return "-"
    return time.strftime("%m-%d %H:%M:%S" if seconds else "%m-%d %H:%M", time.localtime(epoch))


def clock_time(epoch: float | None) -> str:
    """Local time of day to the millisecond, for events within one run (the day is in the run's header)."""
    if epoch is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}"


def zone_name() -> str:
    """The local zone's abbreviation (UTC, CET...), or its offset where the system has no abbreviation."""
    name = time.strftime("%Z")
    return name if name and name.isalpha() else time.strftime("%z")


def iso_time(epoch: float | None) -> str | None:
    """ISO 8601 with offset, for JSON and exports that leave this machine."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="milliseconds")
