"""Decide which sandbox layers a run gets on this machine, build the command that enforces them, report them.

The plan lists every layer with its state, so the summary and the audit say what was (and was not) in force;
`probe.capabilities()` answers the same questions for `outloop doctor` without starting a run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from outloop_cli.errors import SandboxError
from outloop_cli.home import ensure_private_dir
from outloop_cli.linux import is_dumpable
from outloop_cli.profiles import Profile
from outloop_cli.sandbox import bubblewrap, namespaces, view
from outloop_cli.sandbox.installation import command_dirs, outloop_dirs, system_links
from outloop_cli.sandbox.probe import backend as choose_backend
from outloop_cli.secrets import source_kind
from outloop_cli.units import format_bytes

RELAY_PORTS = (20000, 60000)
HOMES_DIR = "homes"  # $OUTLOOP_HOME/homes/<workspace>: each workspace's persistent HOME
_FILE_SECRET = re.compile(r"""["']file:([^"'\n]+)["']""")


@dataclass(frozen=True)
class Plan:
    """The wrapper argv that enforces the layers, and the layers as the summary and the audit state them."""

    layers: dict[str, str]
    wrapper: list[str] = field(default_factory=list)  # goes before the resolved command
    network_isolated: bool = False
    relay_port: int | None = None
    proxy_port: int | None = None  # the egress proxy, relayed like the base-URL listener
    wrapper_persists: bool = False  # a wrapper stays as the loop's parent (bubblewrap, the init, the relay)
    child_home: str | None = None  # HOME for the child (the workspace's own) when the workspace view applies

    def command(self, resolved: Sequence[str]) -> list[str]:
        return [*self.wrapper, *resolved]


@dataclass(frozen=True)
class Target:
    """What is being run and from where: the inputs of the view besides the profile."""

    executable: str
    search_path: str
    home: Path  # OUTLOOP_HOME
    run_dir: Path
    environ: Mapping[str, str]
    profile_dirs: Sequence[Path] = ()


def user_home(environ: Mapping[str, str]) -> str:
    """The operator's real home (`~` in [run] read/write and `hide`), not the child's per-workspace HOME."""
    return environ.get("HOME") or str(Path.home())


def workspace_home(home: Path, workspace: str) -> Path:
    return home / HOMES_DIR / workspace


def plan(profile: Profile, network: str, target: Target, relay_socket: Path | None,
         proxy_socket: Path | None = None) -> Plan:
    """Choose the layers for this run; raise SandboxError (exit 125) when the profile requires one we lack."""
    layers = {"environment": "stripped", "supervision": "own session + subreaper"}
    layers["broker_memory"] = "dumpable (PR_SET_DUMPABLE unavailable)" if is_dumpable() else "not dumpable"
    backend = choose_backend(target.environ)
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
    relay = (random.randrange(*RELAY_PORTS), relay_socket) if (isolate and relay_socket is not None) else None
    proxy = _proxy_relay(profile, isolate, proxy_socket, relay[0] if relay else None)
    relays = [pair for pair in (relay, proxy) if pair is not None]
    if proxy is not None:
        layers["egress"] = f"proxy on, {len(profile.run.egress)} egress rule(s)"
    wrapper: list[str] = []
    child_home: str | None = None
    if backend is None:
        layers["filesystem"] = "NOT isolated (no mount namespace): the child sees and writes the host"
        layers["processes"] = "NOT isolated (no namespaces): shared PID namespace and session"
    else:
        seen = build_view(profile, target)
        layers["filesystem"] = seen.describe()
        layers["processes"] = _processes_layer()
        cwd = os.getcwd()
        if seen.mode == view.WORKSPACE:
            child_home = str(workspace_home(target.home, profile.workspace))
        if backend == "bwrap":
            wrapper = bubblewrap.command(seen, isolate_network=isolate, cwd=cwd)
            if relays:
                wrapper += namespaces.relay_command(relays)
        else:
            wrapper = namespaces.command(seen, isolate_network=isolate, cwd=cwd, run_dir=target.run_dir,
                                         relays=relays)
    limits = _limits(profile)
    if limits:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise SandboxError("the profile sets run.memory/processes/cpu_seconds but prlimit (util-linux) is "
                               "not installed")
        wrapper += [prlimit, *limits[0], "--"]
        layers["limits"] = limits[1]
    return Plan(layers=layers, wrapper=wrapper, network_isolated=isolate,
                relay_port=relay[0] if relay is not None else None, proxy_port=proxy[0] if proxy is not None else None,
                wrapper_persists=backend is not None, child_home=child_home)


def _proxy_relay(profile: Profile, isolate: bool, proxy_socket: Path | None, taken: int | None
                 ) -> tuple[int, Path] | None:
    """The egress proxy is on by default where the network is isolated, and needs that isolation: a listener in
    the child's namespace is reached by nothing else (a TCP port on the host could not say who connects), and
    the broker serves the one the relay hands over there without a peer check of its own."""
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
    return port, proxy_socket


def _processes_layer() -> str:
    held = "; root held: uid 0 in a user namespace, no capabilities" if os.geteuid() == 0 else ""
    return ("own PID, IPC and UTS namespaces, new session, no nested user namespaces, no_new_privs, dies with "
            "outloop" + held)


def build_view(profile: Profile, target: Target) -> view.View:
    """The workspace (or host) view for this profile, run and machine."""
    environ = target.environ
    home_dir = user_home(environ)
    # target.home: config.toml's [audit.central] password may be a file: secret too.
    secrets = secret_files(profile, [*target.profile_dirs, target.home / "profiles", target.home], home_dir)
    runtime = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    masks = [str(target.home), *view.home_masks(home_dir, runtime), *secrets]
    if environ.get("XDG_DATA_HOME"):
        masks += [os.path.join(environ["XDG_DATA_HOME"], rel) for rel in ("python_keyring", "keyrings")]
    masks += [expand(item, home_dir) for item in profile.run.hide]
    mode = profile.run.filesystem
    keep = [str(target.run_dir)]
    if mode == view.WORKSPACE:
        keep.append(str(_ensure_workspace_home(target.home, profile.workspace)))
    lookup = [str(d) for d in target.profile_dirs]
    own = outloop_dirs()
    keyring_config = os.path.join(environ.get("XDG_CONFIG_HOME") or os.path.join(home_dir, ".config"),
                                  "python_keyring")
    if mode == view.HOST:  # made to exist, so it can be bound read-only (view.build protects only what exists)
        os.makedirs(keyring_config, mode=0o700, exist_ok=True)
    request = view.ViewRequest(
        mode=mode, cwd=os.getcwd(), user_home=home_dir, outloop_home=str(target.home), keep=tuple(keep),
        installation=(*command_dirs(target.executable, target.search_path), *own, *system_links()),
        read=tuple(expand(p, home_dir) for p in profile.run.read),
        write=tuple(expand(p, home_dir) for p in profile.run.write),
        masks=tuple(masks), secret_files=tuple(secrets),
        # keyring's keyringrc.cfg names a backend module and a path to import it from: the broker would run it
        protected=(*lookup, str(target.home), *own, keyring_config), lookup_dirs=tuple(lookup),
    )
    return view.build(request)


def expand(path: str, home_dir: str) -> str:
    """`~` and `~/...` are the operator's real home; other paths are taken as written (absolute)."""
    if path == "~" or path.startswith("~/"):
        return home_dir + path[1:]
    return path


def secret_files(profile: Profile, dirs: Iterable[Path], home_dir: str) -> list[str]:
    """Every `file:` secret of every profile in every lookup dir (not only this run's): another workspace's key
    file is as much a secret to this loop as its own."""
    found = []
    for credential in profile.credentials.values():
        kind, argument = source_kind(credential.secret_ref)
        if kind == "file":
            found.append(expand(argument, home_dir))
    for directory in dict.fromkeys(dirs):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".toml"):
                continue
            try:
                text = (directory / name).read_text(errors="replace")
            except OSError:
                continue
            found += [expand(match, home_dir) for match in _FILE_SECRET.findall(text)]
    return list(dict.fromkeys(found))


def _ensure_workspace_home(home: Path, workspace: str) -> Path:
    return ensure_private_dir(workspace_home(home, workspace), within=home)


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
