"""A real PostgreSQL for the central-audit tests: Debian's server binaries, run by the test setup.

One server per test session (initdb + pg_ctl in a temporary directory, as the unprivileged test user, on
127.0.0.1 at a free port, password authentication); each test gets a database of its own. In CI (CI=true) a
missing server is a failure, never a skip: `.ci/run` installs the `postgresql` package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from sandbox_support import unprivileged_user

if TYPE_CHECKING:
    from conftest import World

SUPERUSER = "outloop"


def server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Postgres:
    """A running cluster; ``password`` is the superuser's, a canary that must never appear in outloop's output."""

    bin_dir: Path
    data: Path
    port: int
    password: str
    user: str

    def _as_user(self, *argv: str) -> list[str]:
        if os.geteuid() != 0:
            return list(argv)
        return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.user, "--", *argv]

    def start(self) -> None:
        subprocess.run(self._as_user(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l",
                                     str(self.data.parent / "server.log"), "-w", "-t", "60",
                                     "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                                           f"-c unix_socket_directories={self.data.parent}", "start"),
                       check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(self._as_user(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                     "stop"), check=True, capture_output=True)

    def dsn(self, dbname: str = "postgres") -> str:
        """Without the password: outloop reads it from a secret source, as config.toml says."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname), password=self.password, autocommit=True)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return name


@contextlib.contextmanager
def running_postgres(bin_dir: Path) -> Iterator[Postgres]:
    """initdb and start a cluster in a fresh temporary directory, as the unprivileged user; remove it after."""
    account = unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="ol-pg-", dir="/tmp"))
    os.chown(base, account.pw_uid, account.pw_gid)
    password = f"cnry-pg-{secrets.token_hex(8)}"
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    os.chown(pwfile, account.pw_uid, account.pw_gid)
    server = Postgres(bin_dir, base / "data", free_port(), password, account.pw_name)
    try:
        subprocess.run(server._as_user(str(bin_dir / "initdb"), "-D", str(server.data), "-U", SUPERUSER,
                                       "--pwfile", str(pwfile), "--auth", "scram-sha-256", "-E", "UTF8",
                                       "--no-sync", "--locale", "C"), check=True, capture_output=True)
        pwfile.unlink()
        server.start()
        yield server
    finally:
        subprocess.run(server._as_user(str(bin_dir / "pg_ctl"), "-D", str(server.data), "-m", "immediate",
                                       "stop"), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bin_dir = server_bin()
    if bin_dir is None:
        message = "PostgreSQL server binaries are missing (/usr/lib/postgresql/*/bin): install the postgresql package"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with running_postgres(bin_dir) as server:
        yield server

PASSWORD_VARIABLE = "CENTRAL_PG_PASSWORD"


def ship_to(world: World, server: Postgres, dbname: str, host_id: str, password: str | None = None) -> None:
    """Point a World's outloop at the central database as host ``host_id``; the password comes from env: unless
    ``password`` names another source (the caller puts the password there)."""
    world.extra_env[PASSWORD_VARIABLE] = server.password
    (world.home / "config.toml").write_text(
        f'[audit.central]\ndsn = "{server.dsn(dbname)}"\npassword = "{password or "env:" + PASSWORD_VARIABLE}"\n'
        f'host_id = "{host_id}"\n'
    )
