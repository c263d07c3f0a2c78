"""Decide which sandbox layers a run gets on this machine, build the command that enforces them, report them.

The plan lists every layer with its state, so the summary and the audit say what was (and was not) in force;
`capabilities()` answers the same questions for `outloop doctor` without starting a run.
"""

from __future__ import annotations

import os
import random
import shutil
import site
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from outloop_cli.errors import SandboxError
from outloop_cli.linux import is_dumpable
from outloop_cli.profiles import Profile
from outloop_cli.secrets import source_kind
from outloop_cli.units import format_bytes

BACKEND_ENV = "OUTLOOP_SANDBOX"  # auto (default) | bwrap | unshare: force a backend, for tests and odd machines
RELAY_PORTS = (20000, 60000)

# Where password managers and keyring backends keep their data, relative to the user's home / XDG dirs.
_KEYRING_HOME_PATHS = (".local/share/keyrings", ".local/share/kwalletd", ".local/share/python_keyring",
                       ".password-store", ".gnupg", ".config/op", ".op", ".aws", ".config/gcloud")
_KEYRING_RUNTIME_PATHS = ("bus", "keyring", "gnupg")  # secret-service / gpg-agent sockets in XDG_RUNTIME_DIR


@dataclass(frozen=True)
class Capability:
    """One sandbox layer on this machine: can outloop use it, and if not, how to get it."""

    name: str
    available: bool
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Plan:
    """The wrapper argv that enforces the layers, and the layers as the summary and the audit state them."""

    layers: dict[str, str]
    wrapper: list[str] = field(default_factory=list)  # goes before the resolved command
    network_isolated: bool = False
    relay_port: int | None = None
    proxy_port: int | None = None  # the egress proxy, relayed like the base-URL listener
    wrapper_persists: bool = False  # bubblewrap or the relay stay as the loop's parent; prlimit and init exec


    def command(self, resolved: Sequence[str]) -> list[str]:
        return [*self.wrapper, *resolved]


@cache
def bubblewrap_path() -> str | None:
    return shutil.which("bwrap")


@cache
def _probe(argv: tuple[str, ...]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def bubblewrap_works() -> bool:
    path = bubblewrap_path()
    return bool(path) and _probe((str(path), "--unshare-net", "--dev-bind", "/", "/", "--", "true"))


def namespaces_work() -> bool:
    """Can sandbox_init's own unshare() path run here? Probed by running it on `true`."""
    return sys.platform.startswith("linux") and _probe(
        (sys.executable, "-m", "outloop_cli.sandbox_init", "--unshare", "--", "/bin/true"))


def _backend(environ: Mapping[str, str]) -> str | None:
    """"bwrap", "unshare" or None, honouring OUTLOOP_SANDBOX."""
    forced = environ.get(BACKEND_ENV, "auto")
    if forced not in ("auto", "bwrap", "unshare"):
        raise SandboxError(f"{BACKEND_ENV}={forced!r}: expected auto, bwrap or unshare")
    if forced in ("auto", "bwrap") and bubblewrap_works():
        return "bwrap"
    if forced == "bwrap":
        raise SandboxError(f"{BACKEND_ENV}=bwrap but bubblewrap is missing or cannot create namespaces; "
                           "install bubblewrap (apt-get install bubblewrap)")
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
    who = "root: mount + network namespaces" if os.geteuid() == 0 else "unprivileged user + network namespaces"
    return [
        Capability("environment", True, "child environment stripped to env_keep + env_set"),
        Capability(
            "bubblewrap", bwrap_ok,
            f"{bwrap} works" if bwrap_ok else (f"{bwrap} is installed but cannot create namespaces" if bwrap
                                                else "bwrap is not installed"),
            None if bwrap_ok else "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)",
        ),
        Capability(
            "user_namespaces", userns_ok, f"{who} work" if userns_ok else "cannot create namespaces",
            None if userns_ok else "enable them: sysctl kernel.unprivileged_userns_clone=1 and "
                                   "user.max_user_namespaces > 0 (Ubuntu 24.04+: also "
                                   "kernel.apparmor_restrict_unprivileged_userns=0), or install bubblewrap",
        ),
        Capability(
            "network_isolation", either,
            ("broker-only network via " + ("bubblewrap" if bwrap_ok else "namespaces")) if either
            else "no way to give the child its own network namespace",
            None if either else "install bubblewrap or enable unprivileged user namespaces",
        ),
        Capability(
            "hidden_paths", either,
            "OUTLOOP_HOME, keyring stores, file: secrets and `hide` paths masked in the child's mount namespace"
            if either else "needs a mount namespace",
            None if either else "install bubblewrap or enable unprivileged user namespaces",
        ),
        Capability("dumpable", linux, "PR_SET_DUMPABLE=0 protects the broker's memory and /proc files" if linux
                   else "not on this platform", None if linux else "Linux only"),
        Capability("subreaper", linux, "PR_SET_CHILD_SUBREAPER catches double-forked children" if linux
                   else "not on this platform", None if linux else "Linux only"),
        Capability("rlimits", bool(prlimit), "run.memory / processes / cpu_seconds via prlimit" if prlimit
                   else "prlimit (util-linux) not found", None if prlimit else "install util-linux"),
    ]


def hidden_paths(profile: Profile, home: Path, environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(directories, files) the child must not read, resolved and de-duplicated; missing paths are skipped."""
    user_home = Path(environ.get("HOME") or Path.home())
    candidates = [home]
    candidates += [user_home / rel for rel in _KEYRING_HOME_PATHS]
    if environ.get("XDG_DATA_HOME"):
        candidates += [Path(environ["XDG_DATA_HOME"]) / "python_keyring", Path(environ["XDG_DATA_HOME"]) / "keyrings"]
    runtime = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    candidates += [Path(runtime) / rel for rel in _KEYRING_RUNTIME_PATHS]
    for credential in profile.credentials.values():
        kind, argument = source_kind(credential.secret_ref)
        if kind == "file":
            candidates.append(Path(argument).expanduser())
    candidates += [Path(os.path.expanduser(item.replace("~", str(user_home), 1) if item.startswith("~") else item))
                   for item in profile.run.hide]
    return _classify(candidates)


def _classify(paths: Iterable[Path]) -> tuple[list[str], list[str]]:
    dirs: list[str] = []
    files: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if real == "/" or not os.path.lexists(real):
            continue
        (dirs if os.path.isdir(real) else files).append(real)
    dirs = sorted(set(dirs), key=len)
    covered: list[str] = []
    for directory in dirs:  # a dir inside an already hidden dir needs no mask of its own
        if not any(directory.startswith(parent + "/") for parent in covered):
            covered.append(directory)
    files = sorted({f for f in files if not any(f.startswith(parent + "/") for parent in covered)})
    return covered, files


def readonly_dirs(profile_dirs: Iterable[Path], hidden: Sequence[str]) -> list[str]:
    """Dirs the child may read but not change: the profile lookup path (so it cannot rewrite or shadow the rules
    of the next run) and outloop's own installation (the code, and the interpreter's start-up files, that will
    hold the next run's secrets). Dirs already hidden, or inside one, need nothing.
    """
    package = Path(__file__).resolve().parent
    candidates = [*profile_dirs, package, Path(sys.prefix), Path(site.getusersitepackages())]
    found = sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)}, key=len)
    chosen: list[str] = []
    for path in found:
        if path != "/" and not any(path == top or path.startswith(top + "/") for top in [*hidden, *chosen]):
            chosen.append(path)
    return chosen


def plan(profile: Profile, network: str, *, home: Path, run_dir: Path, environ: Mapping[str, str],
         relay_socket: Path | None, profile_dirs: Sequence[Path] = (), proxy_socket: Path | None = None) -> Plan:
    """Choose the layers for this run; raise SandboxError (exit 125) when the profile requires one we lack."""
    layers = {"environment": "stripped", "supervision": "process group + subreaper"}
    layers["broker_memory"] = "dumpable (PR_SET_DUMPABLE unavailable)" if is_dumpable() else "not dumpable"
    backend = _backend(environ)
    isolate = network != "open" and backend is not None
    if network == "broker-only" and not isolate:
        raise SandboxError(
            "network = \"broker-only\" but this machine cannot isolate the child's network: bubblewrap is not "
            "installed and user namespaces are unavailable. Install bubblewrap (apt-get install bubblewrap) or "
            "enable unprivileged user namespaces; `outloop doctor` shows what is missing")
    if network == "open":
        layers["network"] = "open (by profile)"
    elif isolate:
        layers["network"] = f"broker-only ({'bubblewrap' if backend == 'bwrap' else 'namespaces'})"
    else:
        layers["network"] = "NOT isolated (no bubblewrap, no user namespaces)"
    wrapper: list[str] = []
    relay_port = random.randrange(*RELAY_PORTS) if (isolate and relay_socket is not None) else None
    proxy_port = _proxy_port(profile, isolate, proxy_socket, relay_port)
    relays = [(port, path) for port, path in ((relay_port, relay_socket), (proxy_port, proxy_socket))
              if port is not None and path is not None]
    if proxy_port is not None:
        layers["egress"] = f"proxy on, {len(profile.run.egress)} egress rule(s)"
    if backend is None:
        layers["hidden_paths"] = "NOT hidden (no mount namespace)"
    else:
        dirs, files = hidden_paths(profile, home, environ)
        _refuse_hidden_cwd(dirs)
        readonly = readonly_dirs(profile_dirs, dirs)
        layers["hidden_paths"] = f"{len(dirs) + len(files)} masked; profile and code dirs read-only: {len(readonly)}"
        if backend == "bwrap":
            wrapper = _bubblewrap(dirs, files, run_dir, isolate, readonly)
            if relays:
                wrapper += _init(relays=relays)
        else:
            wrapper = _init(unshare=(dirs, files, run_dir, isolate), readonly=readonly, relays=relays)
    limits = _limits(profile)
    if limits:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise SandboxError("the profile sets run.memory/processes/cpu_seconds but prlimit (util-linux) is "
                               "not installed")
        wrapper += [prlimit, *limits[0], "--"]
        layers["limits"] = limits[1]
    return Plan(layers=layers, wrapper=wrapper, network_isolated=isolate, relay_port=relay_port,
                proxy_port=proxy_port, wrapper_persists=backend == "bwrap" or bool(relays))


def _proxy_port(profile: Profile, isolate: bool, proxy_socket: Path | None, taken: int | None) -> int | None:
    """The egress proxy is on by default where the network is isolated, and needs that isolation: the relay in
    the child's namespace is what lets the broker check who connects (a TCP port on the host could not)."""
    if proxy_socket is None or profile.run.proxy is False:
        return None
    if not isolate:
        if profile.run.proxy:
            raise SandboxError(
                f"{profile.path}: run.proxy = true needs the child's network isolated (the proxy is reached "
                "through a relay inside the child's network namespace); use network = \"auto\" or "
                "\"broker-only\" on a machine with bubblewrap or user namespaces, or set proxy = false")
        return None
    while (port := random.randrange(*RELAY_PORTS)) == taken:
        pass
    return port


def _refuse_hidden_cwd(dirs: list[str]) -> None:
    """The loop would start in an empty mask and fail as if it were its own fault: say so before it starts."""
    cwd = os.path.realpath(os.getcwd())
    hiding = next((d for d in dirs if cwd == d or cwd.startswith(d + "/")), None)
    if hiding is not None:
        raise SandboxError(f"the current directory {cwd} is inside {hiding}, which the sandbox hides from the "
                           "child; cd to the loop's own directory and run again")


def _bubblewrap(dirs: list[str], files: list[str], run_dir: Path, isolate: bool, readonly: list[str]) -> list[str]:
    argv = [str(bubblewrap_path()), "--dev-bind", "/", "/", "--die-with-parent"]
    if isolate:
        argv.append("--unshare-net")
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]  # root in the sandbox must not be able to unmount the masks
    for directory in readonly:  # first: the masks below go on top of these binds, never under them
        argv += ["--ro-bind", directory, directory]
    for directory in dirs:
        argv += ["--tmpfs", directory]
    for file in files:
        argv += ["--ro-bind", "/dev/null", file]
    argv += ["--bind", str(run_dir), str(run_dir), "--chdir", os.getcwd(), "--"]
    return argv


def _init(*, unshare: tuple[list[str], list[str], Path, bool] | None = None, readonly: Sequence[str] = (),
          relays: Sequence[tuple[int, Path]] = ()) -> list[str]:
    argv = [sys.executable, "-m", "outloop_cli.sandbox_init"]
    if unshare is not None:
        dirs, files, run_dir, isolate = unshare
        argv.append("--unshare")
        if not isolate:
            argv.append("--share-network")
        for directory in readonly:
            argv += ["--readonly-dir", directory]
        for directory in dirs:
            argv += ["--hide-dir", directory]
        for file in files:
            argv += ["--hide-file", file]
        argv += ["--keep-dir", str(run_dir)]
    for port, path in relays:
        argv += ["--relay", str(port), str(path)]
    return [*argv, "--"]


def _limits(profile: Profile) -> tuple[list[str], str] | None:
    settings = profile.run
    flags, shown = [], []
    if settings.memory:
        flags.append(f"--as={settings.memory}")
        shown.append(f"memory {format_bytes(settings.memory)}")
    if settings.processes:
        flags.append(f"--nproc={settings.processes}")
        shown.append(f"processes {settings.processes}")
    if settings.cpu_seconds:
        # Soft limit sends SIGXCPU (the loop may catch it and wrap up); the hard limit, 2 s later, SIGKILL.
        flags.append(f"--cpu={settings.cpu_seconds}:{settings.cpu_seconds + 2}")
        shown.append(f"cpu {settings.cpu_seconds}s")
    return (flags, ", ".join(shown)) if flags else None
