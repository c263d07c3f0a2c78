"""The names shell completion offers that change without regenerating the scripts: workspaces, credentials, runs,
and `run --each` selections (workspaces, @tags, all).

The generated scripts call `outloop __complete KIND [WORKSPACE]`, which prints these one per line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from outloop_cli.audit.schema import open_readonly
from outloop_cli.audit.store import list_runs
from outloop_cli.errors import ProfileError
from outloop_cli.home import audit_db_path, outloop_home, profile_dirs
from outloop_cli.profiles import load_profile, runnable_workspaces

KINDS = ("workspaces", "credentials", "runs", "selections")
_RECENT_RUNS = 20


def completion_values(kind: str, args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Names of `kind`; raises OutloopError (or OSError, sqlite3.Error) when they cannot be known."""
    dirs = profile_dirs(None, environ)
    if kind == "workspaces":
        return sorted(runnable_workspaces(dirs))  # a base (abstract = true) is not offered
    if kind == "selections":  # `run --each`: a workspace, @TAG or all
        return ["all", *sorted(runnable_workspaces(dirs)), *(f"@{tag}" for tag in _tags(dirs))]
    if kind == "credentials":
        return sorted(load_profile(args[0], dirs).credentials) if args else []
    if kind == "runs":
        conn = open_readonly(audit_db_path(outloop_home(environ)))
        try:
            return ["last", *(run.run_id for run in list_runs(conn, limit=_RECENT_RUNS))]
        finally:
            conn.close()
    return []


def _tags(dirs: Sequence[Path]) -> list[str]:
    tags: set[str] = set()
    for name in runnable_workspaces(dirs):
        try:
            tags.update(load_profile(name, dirs).tags)
        except ProfileError:
            continue  # a broken profile must not cost the others their completion
    return sorted(tags)
