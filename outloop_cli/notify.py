"""The `[notify]` hook: after a run, tell someone (mail, a chat webhook) when it failed, was refused, or errored.

The hook runs outside the sandbox, as outloop's own user, after the child's tree is gone. It gets the run summary
as JSON on stdin and nothing else: a stripped environment (NOTIFY_ENV_KEEP), no inherited fds, its own session,
and a time limit. Whatever it does, the run's exit code stays the child's; the outcome is audited and summarised.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

NOTIFY_TIMEOUT = 30.0  # a hung mail command must not hold the nightly run open
# What a mail or curl command needs to work, and nothing of outloop's (no OUTLOOP_*, no keyring selection).
NOTIFY_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_*", "TZ")
_PROBLEM_TAIL = 200


@dataclass(frozen=True)
class NotifyOutcome:
    """What the hook did; `error` is outloop's own words (not found, timed out) or the last line of its stderr."""

    triggers: list[str]
    command: str  # the program only: its arguments may carry a webhook token
    exit_code: int | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def triggers(on: Sequence[str], summary: Mapping[str, Any]) -> list[str]:
    """Which of the profile's `on` conditions this run meets: failure (non-zero exit), denied (any refused
    request), errors (any upstream failure: 4xx/5xx, unreachable, timed out)."""
    met = {
        "failure": summary.get("exit_code") not in (0, None),
        "denied": bool(summary.get("denials")),
        "errors": bool(summary.get("errors")),
    }
    return [condition for condition in on if met.get(condition)]


def hook_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in NOTIFY_ENV_KEEP)}


def run_hook(command: Sequence[str], fired: list[str], summary: Mapping[str, Any],
             environ: Mapping[str, str]) -> NotifyOutcome:
    """Run the hook once with the summary on stdin; never raises, since the run's own result matters more."""
    program = os.path.basename(command[0])
    try:
        completed = subprocess.run(
            list(command), input=json.dumps(summary).encode(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=hook_environment(environ), timeout=NOTIFY_TIMEOUT, start_new_session=True, check=False)
    except FileNotFoundError:
        return NotifyOutcome(fired, program, None, f"{command[0]!r} was not found")
    except PermissionError:
        return NotifyOutcome(fired, program, None, f"{command[0]!r} is not executable")
    except subprocess.TimeoutExpired:
        return NotifyOutcome(fired, program, None, f"did not finish within {NOTIFY_TIMEOUT:.0f}s and was killed")
    except OSError as exc:
        return NotifyOutcome(fired, program, None, f"could not start: {exc.strerror}")
    if completed.returncode == 0:
        return NotifyOutcome(fired, program, 0, None)
    lines = completed.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = lines[-1][:_PROBLEM_TAIL] if lines else f"exited with code {completed.returncode}"
    return NotifyOutcome(fired, program, completed.returncode, detail)
