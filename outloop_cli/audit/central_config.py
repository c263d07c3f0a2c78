"""`[audit.central]` in config.toml: where this host ships its audit, under which host id, with which password.

Parsed without psycopg, so a run that ships nothing (no such table) pays nothing, and a mistake in the table is
named by file and key before any connection is tried.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from outloop_cli.errors import UsageError
from outloop_cli.home import config_path, load_config
from outloop_cli.secrets import Secret, resolve_secret
from outloop_cli.units import parse_duration

# The end-of-run ship gives up after this long; libpq's connect_timeout counts whole seconds, minimum 2.
DEFAULT_TIMEOUT: Final = 2.0
_KEYS: Final = ("dsn", "password", "host_id", "timeout")
# `password = "keyring"` is looked up as service outloop/<this>, user "password" (see `secret set`).
KEYRING_WORKSPACE: Final = "audit.central"
KEYRING_CREDENTIAL: Final = "password"


@dataclass(frozen=True)
class CentralConfig:
    """The parsed table; ``password_ref`` is a secret source ("keyring", "env:VAR"...), never a value."""

    dsn: str
    host_id: str
    password_ref: str | None
    timeout: float
    source: Path

    def password(self, environ: Mapping[str, str]) -> Secret | None:
        if self.password_ref is None:
            return None
        return resolve_secret(KEYRING_WORKSPACE, KEYRING_CREDENTIAL, self.password_ref, environ)


def load_central(home: Path) -> CentralConfig | None:
    """The `[audit.central]` table of config.toml, or None when there is none (shipping is off)."""
    path = config_path(home)
    audit = load_config(home).get("audit")
    if audit is None:
        return None
    if not isinstance(audit, dict):
        raise UsageError(f"{path}: `audit` must be a table ([audit.central]), not {type(audit).__name__}")
    table = audit.get("central")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"{path}: `audit.central` must be a table with dsn, password, host_id")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key audit.central.{unknown[0]}; the keys are {', '.join(_KEYS)}")
    return CentralConfig(
        dsn=_text(path, table, "dsn", required=True) or "",
        host_id=_text(path, table, "host_id") or socket.gethostname(),
        password_ref=_password_ref(path, table),
        timeout=_timeout(path, table),
        source=path,
    )


def _text(path: Path, table: Mapping[str, object], key: str, *, required: bool = False) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise UsageError(f"{path}: audit.central.{key} is missing; e.g. "
                             "dsn = \"postgresql://outloop@audit.internal/outloop\"")
        return None
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{path}: audit.central.{key} must be a non-empty string")
    return value.strip()


def _password_ref(path: Path, table: Mapping[str, object]) -> str | None:
    ref = _text(path, table, "password")
    if ref is None:
        return None
    if ref != "keyring" and ref.partition(":")[0] not in ("env", "file", "cmd"):
        raise UsageError(f"{path}: audit.central.password names where the password lives, not the password: "
                         "write \"keyring\", \"env:VAR\", \"file:PATH\" or \"cmd:COMMAND\"")
    return ref


def _timeout(path: Path, table: Mapping[str, object]) -> float:
    value = table.get("timeout")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        return parse_duration(value)  # type: ignore[arg-type]  # it refuses other types with a ValueError
    except ValueError as exc:
        raise UsageError(f"{path}: audit.central.timeout: {exc}") from None
