"""Parse the human units used in profiles and flags: durations, rates, sizes.

One place, so `run.timeout`, `--since 7d`, `rate = "10/s"` and `memory = "512M"` all read the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RATE = re.compile(r"(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B?)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_duration(text: str | int | float) -> float:
    """Seconds from "90s", "1h30m", "500ms", "7d" or a bare number of seconds.

    Raises ValueError with the accepted forms, so callers can add the file and key.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError("expected a duration such as \"30s\", \"15m\", \"2h\" or \"7d\"")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        compact = text.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", compact):
            seconds = float(compact)
        else:
            parts = _DURATION_PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise ValueError(
                    f"{text!r} is not a duration; write a number with a unit: ms, s, m, h, d or w "
                    "(e.g. \"30s\", \"1h30m\", \"7d\")"
                )
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:  # TOML allows `inf` and `nan`
        raise ValueError("a duration must be a finite number greater than zero")
    return seconds


@dataclass(frozen=True)
class Rate:
    """A token bucket: `count` requests per `per_seconds`, bursting up to `count`."""

    count: int
    per_seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.per_seconds

    def __str__(self) -> str:
        return f"{self.count}/{self.per_seconds:g}s"


def parse_rate(text: str) -> Rate:
    """A rate from "10/s", "600/min", "5000/h" or "5/10s"."""
    match = _RATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a rate; write COUNT/UNIT such as \"10/s\", \"600/min\" or \"5000/h\"")
    count, multiplier, unit = int(match.group(1)), match.group(2), match.group(3)
    per = (int(multiplier) if multiplier else 1) * _RATE_UNITS[unit]
    if count <= 0 or per <= 0:
        raise ValueError("a rate must allow at least one request per period")
    return Rate(count=count, per_seconds=per)


def parse_size(text: str | int) -> int:
    """Bytes from "512M", "2G", "1GiB" or a bare number of bytes."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError("expected a size such as \"512M\" or \"2G\"")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a size; write a number with K, M, G or T (e.g. \"512M\")")
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value <= 0:
        raise ValueError("a size must be greater than zero")
    return value


def format_duration(seconds: float) -> str:
    """Short human form used in summaries and listings ("1.2s", "3m05s", "2h10m")."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(count: int) -> str:
    """Short human form of a byte count."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def plural(count: int, word: str, many: str | None = None) -> str:
    """"1 secret", "2 secrets": counts in messages read as English."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
