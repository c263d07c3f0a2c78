"""Exceptions that carry a user-facing message and an exit code.

They are turned into output in exactly one place (``cli.py``), so the core never prints.
"""

from __future__ import annotations

# Exit codes of `outloop run`, the same convention as coreutils `timeout` and `env`.
EXIT_TIMEOUT = 124
EXIT_OUTLOOP_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
# Operator commands (audit, workspace, secret, doctor) use these.
EXIT_USAGE = 2
EXIT_PROBLEMS_FOUND = 1
EXIT_AMBIGUOUS = 3  # a shortened run id matches several runs: the message lists them
EXIT_UNAVAILABLE = 4  # a server the command needs (the central audit database) cannot be reached or used


class OutloopError(Exception):
    """A failure the user can act on; ``str()`` is the message, never containing a secret."""

    exit_code: int = EXIT_OUTLOOP_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0])


class ProfileError(OutloopError):
    """A profile could not be found, parsed or validated."""


class SecretError(OutloopError):
    """A credential's secret could not be resolved."""


class InsecureSecretError(SecretError):
    """The secret is there but others may read it (a `file:` open to group or others): refused, and reported as
    `insecure mode` rather than `missing`, since the fix is a chmod, not a new secret."""


class SandboxError(OutloopError):
    """A sandbox layer the profile requires is unavailable."""


class AuditError(OutloopError):
    """The audit database cannot be opened or written; outloop fails closed."""


class UsageError(OutloopError):
    """Bad input to an operator command (unknown workspace, malformed duration...)."""

    exit_code = EXIT_USAGE


class StateDirError(OutloopError):
    """outloop's own state (OUTLOOP_HOME, run dirs, audit.db, config.toml) is unsafe to use: another user's, a
    link, or open to everyone. Refused for every command, never adopted."""
