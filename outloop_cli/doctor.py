"""Diagnose why outloop would or would not work here: keyring, sandbox layers, paths, audit DB, versions.

Each finding carries the fix; only what stops runs from working is a "problem" (and makes doctor exit non-zero),
a missing hardening layer is a warning, because `network = "auto"` runs without it and says so.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from outloop_cli import __version__
from outloop_cli.audit.central_config import load_central
from outloop_cli.audit.health import inspect_database
from outloop_cli.audit.shipped import backlog_readonly
from outloop_cli.errors import OutloopError, ProfileError, StateDirError
from outloop_cli.home import audit_db_path, check_home, outloop_home, profile_dirs
from outloop_cli.profiles import Profile, available_workspaces, load_profile
from outloop_cli.sandbox.probe import capabilities
from outloop_cli.secrets import KEYRING_WAYS_OUT, source_kind
from outloop_cli.units import plural
from outloop_cli.workspaces import current_choice

Status = Literal["ok", "warn", "problem", "info"]
PROBE_TIMEOUT = 15.0
_VERSIONED = ("httptools", "uvloop", "aiohttp", "keyring", "typer", "rich", "psutil")
# Backends that need a desktop session (D-Bus, an unlocked login keychain), which cron and systemd lack.
_DESKTOP_BACKENDS = ("SecretService", "libsecret", "kwallet", "macOS", "Windows")


@dataclass(frozen=True)
class Finding:
    section: str
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Report:
    findings: list[Finding]
    versions: dict[str, str]

    @property
    def problems(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status == "problem"]


def diagnose(environ: Mapping[str, str]) -> Report:
    home = outloop_home(environ)
    try:
        check_home(home)
    except StateDirError as exc:
        # Every other command refuses such a home (125); doctor names it as the problem and still explains the
        # rest of the machine, reading nothing inside it: no profile, config, audit or central backlog.
        refused = Finding("paths", "OUTLOOP_HOME", "problem", f"{exc.message} (nothing in it was read, so the "
                          "profiles, audit and central sections are left out)")
        return Report([refused, *_keyring(uses_keyring=False), *_sandbox(needs_isolation=[], host_view=[])],
                      versions())
    dirs = profile_dirs(None, environ)
    profiles, broken = _load_all(dirs)
    findings = [
        *_paths(home, dirs, profiles, broken, environ),
        *_keyring(uses_keyring=any(source_kind(c.secret_ref)[0] == "keyring"
                                   for p in profiles for c in p.credentials.values())),
        *_sandbox(needs_isolation=[p.workspace for p in profiles if p.run.network == "broker-only"],
                  host_view=[p.workspace for p in profiles if p.run.filesystem == "host"]),
        *_audit(audit_db_path(home)),
        *_central(home, environ),
    ]
    return Report(findings, versions())


def preflight(workspace: str, profiles_dir: Path | None, environ: Mapping[str, str]) -> list[Finding]:
    """A no-op run of `workspace` through the real run path: its profile, every secret from its real source
    (keyring as this user sees it now, cmd: commands run), the sandbox it would get, and a child (`true`) started
    in it. Nothing goes upstream and no [notify] hook runs. Meant for cron an hour before the nightly run."""
    from outloop_cli.runner import RunRequest, execute  # the run stack loads only for `doctor -w`

    section = f"workspace {workspace} (no-op run)"
    no_op = [shutil.which("true", path=environ.get("PATH")) or "/bin/true"]
    try:
        report = execute(RunRequest(command=no_op, workspace=workspace, profiles_dir=profiles_dir,
                                    environ=environ, notify=False))
    except OutloopError as exc:
        return [Finding(section, "run", "problem", exc.message,
                        "fix what it names; `outloop workspace check` and `outloop doctor` list more")]
    if report.exit_code != 0:
        return [Finding(section, "run", "problem", f"the no-op child exited with {report.exit_code} "
                        "inside the sandbox", "see `outloop audit show last`")]
    credentials = ", ".join(sorted(report.tally.credentials)) or "none"
    findings = [Finding(section, "run", "ok", f"secrets resolved ({credentials}), sandbox started, child exited 0 "
                        f"(run {report.run_id})")]
    for layer, state in report.sandbox.items():
        degraded = "NOT" in state
        findings.append(Finding(section, layer, "warn" if degraded else "ok", state,
                                "`outloop doctor` (sandbox section) says how to get it" if degraded else None))
    return findings


def versions() -> dict[str, str]:
    found = {"outloop": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["sqlite"] = sqlite3.sqlite_version
    found["kernel"] = f"{platform.system()} {platform.release()}"
    return found


def _load_all(dirs: Sequence[Path]) -> tuple[list[Profile], list[str]]:
    profiles, broken = [], []
    for name in sorted(available_workspaces(dirs)):
        try:
            profiles.append(load_profile(name, dirs))
        except ProfileError:
            broken.append(name)
    return profiles, broken


def _paths(home: Path, dirs: Sequence[Path], profiles: Sequence[Profile], broken: Sequence[str],
           environ: Mapping[str, str]) -> list[Finding]:
    found = []
    if not home.exists():
        found.append(Finding("paths", "OUTLOOP_HOME", "info", f"{home} (created by the first run)"))
    elif not home.is_dir():
        found.append(Finding("paths", "OUTLOOP_HOME", "problem", f"{home} is not a directory",
                             "set OUTLOOP_HOME to a directory"))
    elif not os.access(home, os.W_OK | os.X_OK):
        found.append(Finding("paths", "OUTLOOP_HOME", "problem", f"{home} is not writable by this user",
                             "chown it to this user, or set OUTLOOP_HOME elsewhere"))
    elif home.stat().st_mode & 0o077:
        found.append(Finding("paths", "OUTLOOP_HOME", "warn", f"{home} is open to group or others",
                             f"chmod 700 {home}"))
    else:
        found.append(Finding("paths", "OUTLOOP_HOME", "ok", str(home)))
    for directory in dirs:
        count = len(list(directory.glob("*.toml"))) if directory.is_dir() else 0
        status: Status = "ok" if count else "warn"
        detail = f"{directory}: {plural(count, 'profile')}" if directory.is_dir() else f"{directory}: does not exist"
        found.append(Finding("paths", "profiles", status, detail,
                             None if count else "create one with `outloop workspace new NAME`"))
    if broken:
        found.append(Finding("paths", "profiles", "warn",
                             f"{plural(len(broken), 'profile')} not loading: {', '.join(broken)}",
                             "`outloop workspace check` lists what is wrong with each"))
    choice = current_choice(home, environ)
    known = {p.workspace for p in profiles} | set(broken)
    if choice is None:
        found.append(Finding("paths", "workspace", "info", "none chosen (runs need -w WORKSPACE)"))
    elif choice.workspace not in known:
        found.append(Finding("paths", "workspace", "warn",
                             f"{choice.workspace} (from {choice.source}) has no profile",
                             "`outloop workspace use NAME`"))
    else:
        found.append(Finding("paths", "workspace", "ok", f"{choice.workspace} (from {choice.source})"))
    return found


def _keyring(uses_keyring: bool) -> list[Finding]:
    """The backend keyring picks here, and a real round trip in a child with no terminal, as under cron."""
    failing: Status = "problem" if uses_keyring else "warn"
    why = "" if uses_keyring else " (no profile uses secret = \"keyring\", so runs are not affected)"
    outcome = _probe()
    backend = str(outcome.get("backend", "unknown"))
    if not outcome.get("ok"):
        step, error = outcome.get("step"), outcome.get("error")
        return [Finding("keyring", "backend", failing,
                        f"{backend}: the {step} step of a test entry failed ({error}){why}", KEYRING_WAYS_OUT)]
    short = backend.rsplit(".", 1)[-1]
    findings = [Finding("keyring", "backend", "ok", f"{backend}: set/get/delete of a test entry works")]
    if any(marker in backend for marker in _DESKTOP_BACKENDS):
        findings.append(Finding("keyring", "headless", "warn",
                                f"{short} needs a desktop session (D-Bus / unlocked keychain) that cron and "
                                "systemd services usually lack", KEYRING_WAYS_OUT))
    elif outcome.get("plaintext"):
        findings.append(Finding("keyring", "headless", "warn", f"{short} works headless but stores secrets "
                                "UNENCRYPTED in a file (`secret set` refuses it without --allow-plaintext)",
                                "move secrets to cmd: (e.g. pass, op read), file: (mode 0600) or env:, or use "
                                "a Secret Service / KWallet keyring; keep this one only on a single-user "
                                "machine with disk encryption"))
    else:
        findings.append(Finding("keyring", "headless", "ok", f"{short} answered with no terminal attached"))
    return findings


def _probe() -> dict[str, object]:
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "outloop_cli.keyring_probe"], capture_output=True, text=True,
            stdin=subprocess.DEVNULL, start_new_session=True, timeout=PROBE_TIMEOUT, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "step": "set", "error": f"no answer within {PROBE_TIMEOUT:.0f}s (an unlock prompt?)"}
    try:
        outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "step": "start", "error": "the probe crashed (is keyring installed?)"}
    return outcome if isinstance(outcome, dict) else {"ok": False, "step": "start", "error": "bad probe output"}


def _sandbox(needs_isolation: Sequence[str], host_view: Sequence[str]) -> list[Finding]:
    findings = []
    for cap in capabilities():
        status: Status = "ok" if cap.available else "warn"
        if not cap.available and cap.name == "network_isolation" and needs_isolation:
            status = "problem"
            detail = f"{cap.detail}; required by network = \"broker-only\" in: {', '.join(needs_isolation)}"
        else:
            detail = cap.detail
        findings.append(Finding("sandbox", cap.name, status, detail, cap.fix))
    if host_view:
        findings.append(Finding("sandbox", "host_view", "warn",
                                "filesystem = \"host\" (the whole host visible and writable) in: "
                                + ", ".join(host_view),
                                "use the default filesystem = \"workspace\" with [run] read/write for what the loop "
                                "needs"))
    return findings


def _audit(path: Path) -> list[Finding]:
    health = inspect_database(path)
    if not health.exists:
        return [Finding("audit", "database", "info", f"{path}: {'; '.join(health.notes)}")]
    facts = [f"schema {health.schema_version}"]
    if health.journal_mode is not None:
        facts += [f"journal {health.journal_mode}", f"quick_check {health.quick_check}", f"{health.runs} runs"]
    summary = f"{path}: {', '.join(facts)}, {health.size_bytes} bytes"
    findings = [Finding("audit", "database", "info" if health.problems else "ok", summary)]
    findings += [Finding("audit", "database", "problem", problem, fix) for problem, fix in health.problems]
    findings += [Finding("audit", "database", "info", note) for note in health.notes]
    return findings


def _central(home: Path, environ: Mapping[str, str]) -> list[Finding]:
    """Whether this host ships its audit, what still waits to be shipped, and whether the server answers."""
    try:
        config = load_central(home)
    except OutloopError as exc:
        return [Finding("central audit", "config", "warn", exc.message, "fix [audit.central] in config.toml")]
    if config is None:
        return [Finding("central audit", "config", "info", "not configured (no [audit.central] in config.toml)")]
    from outloop_cli.audit.central_db import connect, describe, require_schema

    target = f"{describe(config)} as host {config.host_id}"
    findings = [Finding("central audit", "config", "ok", target)]
    waiting = backlog_readonly(audit_db_path(home))
    if waiting is not None:
        status: Status = "ok" if waiting.events == 0 else "info"
        findings.append(Finding("central audit", "backlog", status,
                                f"{waiting.events} events in {waiting.runs} runs not shipped yet",
                                None if waiting.events == 0 else "`outloop audit ship` (or a timer running it)"))
    try:
        conn = connect(config, environ, timeout=config.timeout)
        try:
            require_schema(conn, config)
        finally:
            conn.close()
    except OutloopError as exc:
        findings.append(Finding("central audit", "server", "warn", exc.message,
                                "runs are unaffected; start the server or fix the dsn, then `outloop audit ship`"))
    else:
        findings.append(Finding("central audit", "server", "ok", "reachable, schema current"))
    return findings
