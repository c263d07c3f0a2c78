"""Operator-side workspace management: list, resolve for display, choose, create, and check profiles.

Loading and validation stay in profiles.py; this module answers "which workspaces are there, which one am I in,
and is every one of them ready to run" without ever holding a secret for longer than a presence check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from outloop_cli.auth.config import AuthConfig
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, OutloopError, ProfileError, UsageError
from outloop_cli.guard import declared_identifiers, overlapping_identifiers
from outloop_cli.home import current_workspace, ensure_private_dir, load_config, save_config
from outloop_cli.profiles import (
    Credential,
    Profile,
    available_workspaces,
    check_workspace_name,
    find_profile,
    load_profile,
)
from outloop_cli.secret_admin import SecretStatus, secret_status

ENV_CHOICE = "OUTLOOP_WORKSPACE"


@dataclass(frozen=True)
class WorkspaceEntry:
    """One line of `outloop workspace list`; a profile that does not load is listed with its error."""

    name: str
    path: Path
    current: bool
    description: str = ""
    extends: str | None = None
    credentials: tuple[str, ...] = ()
    error: str | None = None
    abstract: bool = False


@dataclass(frozen=True)
class Choice:
    """The current workspace and what chose it (the environment wins over config.toml, as for `run`)."""

    workspace: str
    source: str


def current_choice(home: Path, environ: Mapping[str, str]) -> Choice | None:
    if environ.get(ENV_CHOICE):
        return Choice(environ[ENV_CHOICE], ENV_CHOICE)
    chosen = current_workspace(home, {})
    return Choice(chosen, str(home / "config.toml")) if chosen else None


def list_workspaces(dirs: Sequence[Path], current: str | None) -> list[WorkspaceEntry]:
    entries = []
    for name, path in sorted(available_workspaces(dirs).items()):
        try:
            profile = load_profile(name, dirs)
        except ProfileError as exc:
            entries.append(WorkspaceEntry(name, path, name == current, error=exc.message))
            continue
        entries.append(WorkspaceEntry(name, path, name == current, profile.description, profile.extends,
                                      tuple(sorted(profile.credentials)), abstract=profile.abstract))
    return entries


def use_workspace(home: Path, dirs: Sequence[Path], name: str) -> Path:
    """Record `name` as the current workspace in config.toml (atomically); it must have a profile."""
    find_profile(name, dirs)
    config = load_config(home)
    config["workspace"] = name
    return save_config(home, config)


# --------------------------------------------------------------------------------------------------
# Showing a resolved profile


def resolved_profile(profile: Profile, statuses: Sequence[SecretStatus]) -> dict[str, object]:
    """The profile after `extends`, as plain data; secrets appear only as present / missing."""
    by_name = {status.credential: status for status in statuses}
    run = profile.run
    return {
        "workspace": profile.workspace,
        "path": str(profile.path),
        "sources": [str(path) for path in profile.sources],
        "description": profile.description,
        "extends": profile.extends,
        "run": {
            "timeout": run.timeout, "max_requests": run.max_requests, "network": run.network,
            "env_keep": list(run.env_keep), "env_set": dict(run.env_set), "hide": list(run.hide),
            "memory": run.memory, "processes": run.processes, "cpu_seconds": run.cpu_seconds,
            "filesystem": run.filesystem, "read": list(run.read), "write": list(run.write),
            "egress": [rule.text for rule in run.egress], "proxy": run.proxy,
        },
        "credentials": {name: _credential(cred, by_name[name]) for name, cred in sorted(profile.credentials.items())},
    }


def auth_settings(auth: AuthConfig) -> dict[str, object]:
    """The scheme's profile settings (no secret lives there), lists as lists for JSON."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in auth._asdict().items()}


def _credential(cred: Credential, status: SecretStatus) -> dict[str, object]:
    inject = cred.inject
    return {
        "owner": cred.owner,
        "secret": status.source,
        "secret_state": status.state,
        "secret_problem": status.problem,
        "base_url": cred.base_url,
        "inject": None if cred.auth else {"style": inject.style, "name": inject.name, "template": inject.template},
        "auth": {cred.auth.scheme: auth_settings(cred.auth)} if cred.auth else None,
        "allow": [rule.text for rule in cred.allow],
        "deny": [rule.text for rule in cred.deny],
        "rate": str(cred.rate) if cred.rate else None,
        "max_requests": cred.max_requests,
        "reveal": cred.reveal,
        "child_env": dict(cred.child_env),
        "description": cred.description,
        "connect_timeout": cred.connect_timeout,
        "read_timeout": cred.read_timeout,
        "ca_file": cred.ca_file,
    }


# --------------------------------------------------------------------------------------------------
# Creating a profile

STARTER = '''\
# outloop profile for workspace "{name}" (schema version 1).
# Check it with `outloop workspace check {name}`; run a loop with `outloop run -w {name} -- COMMAND`.
version = 1
description = "{name}: what the loop that runs here does"
{extends}
[run]
# timeout = "2h"                  # kill the whole run (and every process it started) after this long
# max_requests = 5000             # all credentials together, per run
# network = "auto"                # auto | broker-only | open
# env_set = {{ LOOP_CLIENT = "{name}" }}
# hide = ["~/.ssh", "~/.aws"]     # paths the loop must not read, on top of outloop's own

# One table per credential. The loop calls /v1/http/<credential>/<path> on $OUTLOOP_SOCKET and the broker
# adds the secret; the loop never sees it. Rules are "METHOD PATH-GLOB"; deny wins, no match is deny.
# [credentials.crm]
# secret = "keyring"              # then: outloop secret set {name} crm   (or "env:VAR", "file:PATH", "cmd:...")
# base_url = "https://api.example.com"
# inject = {{ header = "Authorization", value = "Bearer {{secret}}" }}
# allow = ["GET /v3/contacts/**", "POST /v3/contacts"]
# deny = ["DELETE /**"]
# rate = "10/s"
# max_requests = 2000
'''


def new_profile(dirs: Sequence[Path], name: str, *, extends: str | None = None) -> Path:
    """Write a commented starter profile into the first profile directory; never overwrite or shadow one."""
    check_workspace_name(name)
    existing = available_workspaces(dirs).get(name)
    if existing is not None:
        raise UsageError(f"workspace {name!r} already exists: {existing}; edit that file instead")
    if extends is not None:
        find_profile(extends, dirs)
    directory = ensure_private_dir(dirs[0])
    path = directory / f"{name}.toml"
    text = STARTER.format(name=name, extends=f'extends = "{extends}"\n' if extends else "")
    try:
        # "x": fail rather than overwrite if another process created it since the check above.
        with path.open("x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise UsageError(f"workspace {name!r} already exists: {path}; edit that file instead") from None
    except OSError as exc:
        raise OutloopError(f"cannot write {path}: {exc.strerror}") from None
    return path


# --------------------------------------------------------------------------------------------------
# Checking every profile


@dataclass
class WorkspaceCheck:
    """Everything wrong with one workspace, gathered rather than stopping at the first problem."""

    name: str
    path: Path | None
    secrets: list[SecretStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth a look, but no reason to fail a cron check


def check_workspaces(dirs: Sequence[Path], names: Sequence[str] | None, home: Path,
                     environ: Mapping[str, str]) -> list[WorkspaceCheck]:
    """Load each profile and resolve each secret (commands too), each secret once however many extend it."""
    found = available_workspaces(dirs)
    if names is None:
        names = sorted(found)
        if not names:
            searched = ", ".join(str(d) for d in dirs)
            raise OutloopError(f"no profiles in {searched}; create one with `outloop workspace new NAME`",
                               exit_code=EXIT_PROBLEMS_FOUND)
    else:
        for name in names:
            find_profile(name, dirs)  # an unknown name is an error with hints, not a problem line
    cache: dict[tuple[str, str, str], SecretStatus] = {}
    results = [_check_one(name, found.get(name), dirs, environ, cache) for name in names]
    _check_guard_overlaps(results, dirs)
    _check_choice(results, home, environ, found)
    return results


def _check_guard_overlaps(results: list[WorkspaceCheck], dirs: Sequence[Path]) -> None:
    try:
        declared = declared_identifiers(dirs)
    except ProfileError:
        return  # the unreadable [guard] is already that workspace's problem line
    by_name = {result.name: result for result in results}
    for overlap in overlapping_identifiers(declared):
        message = (f"guard identifiers overlap: {overlap.first.rule} and {overlap.second.rule} (one contains the "
                   "other, ignoring case), so a run of one workspace refuses data of its own client; make them "
                   "more specific")
        for name in dict.fromkeys((overlap.first.workspace, overlap.second.workspace)):
            if name in by_name:
                by_name[name].warnings.append(message)


def _check_one(name: str, path: Path | None, dirs: Sequence[Path], environ: Mapping[str, str],
               cache: dict[tuple[str, str, str], SecretStatus]) -> WorkspaceCheck:
    result = WorkspaceCheck(name, path)
    shadowed = [str(d / f"{name}.toml") for d in dirs if (d / f"{name}.toml").is_file()][1:]
    if shadowed:
        result.problems.append(f"also defined in {', '.join(shadowed)}, which is ignored (shadowed by {path})")
    if path is not None and path.stat().st_mode & 0o022:
        # Profiles hold no secrets, but one that others may edit could send a credential to their server.
        result.problems.append(f"{path} is writable by group or others; run `chmod go-w {path}`")
    try:
        profile = load_profile(name, dirs)
    except ProfileError as exc:
        result.problems.append(exc.message)
        return result
    for cred_name, cred in sorted(profile.credentials.items()):
        key = (cred.owner, cred_name, cred.secret_ref)
        if key not in cache:
            cache[key] = secret_status(cred, environ, run_commands=True)
        status = cache[key]
        result.secrets.append(status)
        if status.problem:
            result.problems.append(f"{status.state}: {status.problem}")
    return result


def _check_choice(results: list[WorkspaceCheck], home: Path, environ: Mapping[str, str],
                  found: Mapping[str, Path]) -> None:
    choice = current_choice(home, environ)
    if choice is not None and choice.workspace not in found:
        results.append(WorkspaceCheck(choice.workspace, None, problems=[
            f"the current workspace {choice.workspace!r} (from {choice.source}) has no profile; "
            f"run `outloop workspace use NAME` or fix {choice.source}"]))

