"""Which sandbox layers this machine can give: the backend a run will use, and `outloop doctor`'s report."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from outloop_cli.errors import SandboxError

BACKEND_ENV = "OUTLOOP_SANDBOX"  # auto (default) | bwrap | unshare: force a backend, for tests and odd machines


@dataclass(frozen=True)
class Capability:
    """One sandbox layer on this machine: can outloop use it, and if not, how to get it."""

    name: str
    available: bool
    detail: str
    fix: str | None = None


@cache
def bubblewrap_path() -> str | None:
    return shutil.which("bwrap")


PROBE_TIMEOUT = 10.0
_started: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}


@cache
def _probe(argv: tuple[str, ...]) -> bool:
    try:
        process = _started.pop(argv, None) or _spawn(argv)
        try:
            return process.wait(timeout=PROBE_TIMEOUT) == 0
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
    except OSError:
        return False


def _spawn(argv: tuple[str, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_probe(environ: Mapping[str, str]) -> None:
    """Start the bubblewrap probe that `backend` will ask about, so it runs on another core while the run's own
    modules load; `backend` waits for its answer. Nothing is cached beyond this process: each run probes anew."""
    argv = _bubblewrap_probe()
    if argv is None or environ.get(BACKEND_ENV, "auto") not in ("auto", "bwrap") or argv in _started:
        return
    with contextlib.suppress(OSError):  # `backend` probes again and says what failed
        _started[argv] = _spawn(argv)


def _bubblewrap_probe() -> tuple[str, ...] | None:
    path = bubblewrap_path()
    return (path, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--", "true") if path else None


def bubblewrap_works() -> bool:
    """Can bwrap build what a run needs: every namespace, and no nested user namespaces (bubblewrap >= 0.8)?"""
    argv = _bubblewrap_probe()
    return argv is not None and _probe(argv)


def namespaces_work() -> bool:
    """Can outloop's own init build the namespaces here? Probed by running it on `true`."""
    return sys.platform.startswith("linux") and _probe(
        (sys.executable, "-m", "outloop_cli.sandbox.init", "--probe", "--", "/bin/true"))


def backend(environ: Mapping[str, str]) -> str | None:
    """"bwrap", "unshare" or None, honouring OUTLOOP_SANDBOX."""
    forced = environ.get(BACKEND_ENV, "auto")
    if forced not in ("auto", "bwrap", "unshare"):
        raise SandboxError(f"{BACKEND_ENV}={forced!r}: expected auto, bwrap or unshare")
    if forced in ("auto", "bwrap") and bubblewrap_works():
        return "bwrap"
    if forced == "bwrap":
        raise SandboxError(f"{BACKEND_ENV}=bwrap but bubblewrap is missing, older than 0.8 or cannot create "
                           "namespaces; install bubblewrap (apt-get install bubblewrap)")
    if namespaces_work():
        return "unshare"
    return None


def capabilities() -> list[Capability]:
    """Probe each layer; cheap enough for `outloop doctor` (a few short subprocesses)."""
    linux = sys.platform.startswith("linux")
    bwrap = bubblewrap_path()
    bwrap_ok = linux and bubblewrap_works()
    userns_ok = namespaces_work()
    either = bwrap_ok or userns_ok
    prlimit = shutil.which("prlimit")
    who = "root held in a user namespace" if os.geteuid() == 0 else "unprivileged user namespaces"
    need = "install bubblewrap or enable unprivileged user namespaces"
    return [
        Capability("environment", True, "child environment stripped to env_keep + env_set"),
        Capability(
            "bubblewrap", bwrap_ok,
            f"{bwrap} works" if bwrap_ok else (f"{bwrap} is installed but is older than 0.8 or cannot create "
                                                "namespaces" if bwrap else "bwrap is not installed"),
            None if bwrap_ok else "install bubblewrap >= 0.8 (Debian/Ubuntu: apt-get install bubblewrap)",
        ),
        Capability(
            "user_namespaces", userns_ok, f"{who}: outloop's own namespaces work" if userns_ok
            else "cannot create namespaces",
            None if userns_ok else "enable them: sysctl kernel.unprivileged_userns_clone=1 and "
                                   "user.max_user_namespaces > 0 (Ubuntu 24.04+: also "
                                   "kernel.apparmor_restrict_unprivileged_userns=0), or install bubblewrap",
        ),
        Capability(
            "network_isolation", either,
            ("broker-only network via " + ("bubblewrap" if bwrap_ok else "namespaces")) if either
            else "no way to give the child its own network namespace", None if either else need,
        ),
        Capability(
            "filesystem_view", either,
            "workspace view: system dirs read-only, the working dir writable, a per-workspace HOME, private "
            "/tmp, credential stores and every file: secret masked" if either else "needs a mount namespace",
            None if either else need,
        ),
        Capability(
            "process_isolation", either,
            "own PID, IPC and UTS namespaces, new session, no nested user namespaces, dies with outloop"
            if either else "needs namespaces", None if either else need,
        ),
        Capability("dumpable", linux, "PR_SET_DUMPABLE=0 protects the broker's memory and /proc files" if linux
                   else "not on this platform", None if linux else "Linux only"),
        Capability("subreaper", linux, "PR_SET_CHILD_SUBREAPER catches double-forked children" if linux
                   else "not on this platform", None if linux else "Linux only"),
        Capability("rlimits", bool(prlimit), "run.memory / processes / cpu_seconds via prlimit" if prlimit
                   else "prlimit (util-linux) not found", None if prlimit else "install util-linux"),
    ]
