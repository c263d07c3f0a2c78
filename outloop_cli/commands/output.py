"""Shared output helpers for commands: rich on a terminal, plain text elsewhere, JSON on request.

Rich is imported lazily so `outloop --help` and cron runs do not pay for it when they print nothing fancy.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def wants_plain(stream: IO[str]) -> bool:
    return bool(os.environ.get("NO_COLOR")) or not stream.isatty()


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    plain = wants_plain(stream)
    return Console(file=stream, no_color=plain, highlight=False, soft_wrap=plain,
                   force_terminal=False if plain else None, emoji=False)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def render_to_stderr(plain: Callable[[], str], rich: Callable[[], None]) -> None:
    """A summary on stderr: plain when it is not a terminal (or NO_COLOR), rich otherwise, plain if rich fails.

    A rendering problem must never cost cron the exit code that follows the summary.
    """
    if wants_plain(sys.stderr):
        sys.stderr.write(plain())
        return
    try:
        rich()
    except Exception:
        sys.stderr.write(plain())
