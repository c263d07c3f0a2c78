"""Helpers for attacks on outloop's own files: a state dir planted by another local user, and the writers that
such plants fool (positive controls: what outloop did before it refused them)."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import subprocess
from pathlib import Path

from sandbox_support import skip_or_fail

PLANTER = "nobody"  # the other local user: exists on every Debian-like system


def planter() -> pwd.struct_passwd:
    """Another local user, for attacks that need two accounts; the tests act for it, so they need root."""
    if os.geteuid() != 0:
        skip_or_fail("planting files as another user needs root (CI runs the suite as root)")
    return pwd.getpwnam(PLANTER)


def as_user(user: pwd.struct_passwd, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], capture_output=True, text=True, timeout=60)


def plant_home(path: Path, owner: pwd.struct_passwd, marker: Path) -> None:
    """A world-writable OUTLOOP_HOME owned by `owner`, holding what a neighbour would plant: an audit.db, a
    config.toml choosing a workspace, and that workspace's profile, whose `cmd:` secret touches `marker` if run.

    Every access time is set to 0, so a later read of any file shows (relatime updates an atime older than the
    file's mtime).
    """
    path.parent.chmod(0o755)  # like /tmp: the neighbour can reach the directory it made
    (path / "profiles").mkdir(parents=True)
    with sqlite3.connect(path / "audit.db") as conn:
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, workspace TEXT)")
        conn.execute("INSERT INTO runs VALUES ('planted', 'acme')")
    conn.close()
    (path / "config.toml").write_text('workspace = "acme"\n')
    (path / "profiles" / "acme.toml").write_text(
        f'version = 1\n[credentials.crm]\nsecret = "cmd:touch {marker}"\nbase_url = "http://127.0.0.1:9"\n')
    for entry in [path, *path.rglob("*")]:
        os.chown(entry, owner.pw_uid, owner.pw_gid)
        entry.chmod(0o777 if entry.is_dir() else 0o666)
        info = entry.stat()
        os.utime(entry, ns=(0, info.st_mtime_ns))


def fingerprint(path: Path) -> dict[str, tuple[int, ...]]:
    """Every entry under `path` with its size, times, mode and owner, read by lstat alone (reading the content
    would change the access times it records)."""
    found = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        info = entry.lstat()
        found[str(entry.relative_to(path))] = (info.st_size, info.st_mtime_ns, info.st_atime_ns, info.st_ctime_ns,
                                               info.st_mode, info.st_uid)
    return found


def naive_write_json(path: Path, data: object) -> None:
    """How `--summary-json` was written before: a temp name anyone can predict, opened following links."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def naive_adopt_home(home: Path) -> None:
    """How outloop opened its home before: mkdir that accepts whatever is there, and the audit.db in it."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(home / "audit.db", os.O_RDWR | os.O_CREAT, 0o600))
    with sqlite3.connect(home / "audit.db") as conn:
        conn.execute("INSERT INTO runs VALUES ('operator-run', 'acme')")
    conn.close()
