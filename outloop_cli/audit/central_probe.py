"""A socket-level look at the central server before the end-of-run ship pays for importing psycopg.

When the server is plainly down (connection refused, no socket file), the run learns it in about a millisecond
instead of after a few hundred of importing a database driver. Whatever this cannot read (several hosts,
service files, PG* variables) is left to libpq: the probe only ever answers "certainly unreachable" or "try".
"""

from __future__ import annotations

import os
import socket
from urllib.parse import parse_qs, urlsplit

_DEFAULT_PORT = 5432


def unreachable(dsn: str, timeout: float) -> str | None:
    """Why the server named by ``dsn`` certainly cannot be reached, or None when libpq should try."""
    target = _target(dsn)
    if target is None:
        return None
    host, port = target
    if host.startswith("/"):
        path = os.path.join(host, f".s.PGSQL.{port}")
        return None if os.path.exists(path) else f"no server socket at {path}"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"
    return None


def _target(dsn: str) -> tuple[str, int] | None:
    """(host or socket directory, port) when the DSN names exactly one, with no PG* variable in play."""
    if any(name in os.environ for name in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE")):
        return None
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        if "," in parts.netloc or {"host", "hostaddr", "port", "service"} & set(query):
            return None
        try:
            return (parts.hostname, parts.port or _DEFAULT_PORT) if parts.hostname else None
        except ValueError:
            return None
    words = dict(word.partition("=")[::2] for word in dsn.split() if "=" in word)
    if "service" in words or "hostaddr" in words or "," in words.get("host", "") + words.get("port", ""):
        return None
    host = words.get("host")
    if not host:
        return None
    try:
        return host, int(words.get("port") or _DEFAULT_PORT)
    except ValueError:
        return None
