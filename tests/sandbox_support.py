"""Helpers for sandbox tests: layer detection with the CI rule, an unprivileged user, a tiny DNS responder.

In CI (CI=true) a missing layer is a failure, never a skip: `.ci/run` installs what the layers need.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from outloop_cli.sandbox.probe import capabilities

if TYPE_CHECKING:
    from conftest import World

TEST_USER = "outloop-test"


def skip_or_fail(message: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, which installs everything the suite needs and must run it."""
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI must run these tests, not skip them)")
    pytest.skip(message)


def require_layer(name: str) -> None:
    layer = next(cap for cap in capabilities() if cap.name == name)
    if not layer.available:
        skip_or_fail(f"sandbox layer {name!r} unavailable here: {layer.detail}; fix: {layer.fix}")


def require_program(name: str) -> str:
    """The path of `name` (a shell the completion tests drive, say), which `.ci/run` installs in CI."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed")
    return path


def unprivileged_user() -> pwd.struct_passwd:
    """A throwaway non-root account, created on first use (tests run as root in CI)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            pytest.fail("useradd is missing: install the passwd package")
        subprocess.run([useradd, "--no-create-home", "--shell", "/bin/sh", TEST_USER], check=True)
        return pwd.getpwnam(TEST_USER)


@dataclass(frozen=True)
class OtherUser:
    """A world handed to an unprivileged account: its `outloop`, its python, and the environment to run them."""

    account: pwd.struct_passwd
    bin_dir: Path
    env: dict[str, str]

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run as the account (through runuser when the tests run as root; runuser resets HOME, so it is
        set again from `env`)."""
        if os.geteuid() != 0:
            return argv
        return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.account.pw_name, "--", "/usr/bin/env",
                f"HOME={self.env['HOME']}", *argv]


def as_other_user(world: World) -> OtherUser:
    """Give `world` to the unprivileged test account, with an acme profile whose secret it can read (env:)."""
    account = unprivileged_user()
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "env:ACME_CRM_TOKEN"
        base_url = "{UPSTREAM}"
        allow = ["GET /**"]
    """)
    bin_dir = runtime_for_other_users(world.home.parent / "rt")
    world.home.parent.chmod(0o755)
    home = operator_home(world)
    give_to(account, world.home, world.work, home)
    env = {**world.env, "HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return OtherUser(account, bin_dir, env)


def operator_home(world: World) -> Path:
    """The operator's $HOME for a test: a directory of the world's own, never the real one."""
    home = world.home.parent / "operator-home"
    home.mkdir(exist_ok=True)
    return home


BACKENDS = ("bwrap", "unshare")
OPERATORS = ("root", "user")


def use_backend(world: World, backend: str) -> None:
    require_layer("bubblewrap" if backend == "bwrap" else "user_namespaces")
    world.extra_env["OUTLOOP_SANDBOX"] = backend


@dataclass(frozen=True)
class Operator:
    """Who runs outloop in a hostile test: root, or the unprivileged account; the positive control (the same
    attack without outloop) runs as the same user."""

    name: str
    world: World
    other: OtherUser | None
    home: Path

    @property
    def env(self) -> dict[str, str]:
        return dict(self.other.env) if self.other is not None else {**self.world.env, "HOME": str(self.home)}

    @property
    def python(self) -> str:
        import sys

        return str(self.other.bin_dir / "python") if self.other is not None else sys.executable

    @property
    def outloop(self) -> str:
        from conftest import OUTLOOP

        return str(self.other.bin_dir / "outloop") if self.other is not None else OUTLOOP

    def command(self, argv: list[str]) -> list[str]:
        return self.other.command(argv) if self.other is not None else argv

    def give(self, *paths: Path) -> None:
        if self.other is not None:
            give_to(self.other.account, *paths)

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=cwd or self.world.work)

    def outloop_run(self, *command: str, workspace: str = "acme", flags: tuple[str, ...] = (),
                    env: dict[str, str] | None = None, profiles: Path | None = None, lookup_flag: bool = True,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`outloop run`; `lookup_flag=False` leaves the lookup path to OUTLOOP_PROFILES / OUTLOOP_HOME."""
        lookup = ["--profiles", str(profiles or self.world.profiles)] if lookup_flag else []
        return self.run([self.outloop, "run", "-w", workspace, *lookup, *flags, "--", *command], env=env,
                        timeout=timeout)


def operator(world: World, name: str) -> Operator:
    """`root` needs the tests to run as root (CI does); `user` is the unprivileged account (or, when the tests
    run unprivileged, this user)."""
    if name == "root" and os.geteuid() != 0:
        skip_or_fail("root-operator cases need the tests to run as root")
    if name == "root":
        return Operator(name, world, None, operator_home(world))
    other = as_other_user(world)
    return Operator(name, world, other, Path(other.env["HOME"]))


def give_to(user: pwd.struct_passwd, *paths: Path) -> None:
    for top in paths:
        for root, dirs, files in os.walk(top):
            for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(name, user.pw_uid, user.pw_gid)


class DnsResponder:
    """Answers every A query with 127.0.0.1: a stand-in for the host's resolver on loopback."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            self.queries += 1
            header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
            question = query[12:]
            answer = struct.pack(">HHHLH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
            self.sock.sendto(header + question + answer, peer)

    def close(self) -> None:
        self.sock.close()


DNS_QUERY_LOOP = """
    import socket, struct, sys
    port = int(sys.argv[1])
    name = b"".join(bytes([len(p)]) + p for p in b"api.example.com".split(b".")) + b"\\0"
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    try:
        sock.sendto(query, ("127.0.0.1", port))
        sock.recvfrom(512)
        print("resolved")
    except OSError as exc:
        print("blocked", type(exc).__name__)
"""


_HEAVY = ("mypy*", "*__mypyc*", "openai*", "pip", "pip-*", "ruff*", "hypothesis*", "_pytest", "pytest*",
          "__editable__*", "outloop*", "__pycache__", "setuptools*", "_distutils_hack", "distutils-precedence.pth")


def runtime_for_other_users(base: Path) -> Path:
    """An `outloop` an unprivileged user can execute: the interpreter here often lives under root's 0700 home
    (pyenv), so build a venv from the system Python of the same version and copy the runtime packages in."""
    import sys
    import sysconfig

    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        skip_or_fail(f"{system_python} is missing: a non-root user needs a world-readable Python of this version")
    venv = base / "venv"
    subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    source_site = Path(sysconfig.get_paths()["purelib"])
    shutil.copytree(source_site, site, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_HEAVY))
    package = Path(__file__).resolve().parent.parent / "outloop_cli"
    shutil.copytree(package, site / "outloop_cli", ignore=shutil.ignore_patterns("__pycache__"))
    launcher = venv / "bin" / "outloop"
    launcher.write_text(f"#!{venv / 'bin' / 'python'}\nfrom outloop_cli.cli import main\nmain()\n")
    launcher.chmod(0o755)
    for root, dirs, _ in os.walk(base):
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            os.chmod(name, 0o755)
    return venv / "bin"


def find_process(marker: str, *, outloop: bool = False, timeout: float = 30.0) -> int:
    """The pid of the process whose command line holds `marker`: outloop itself (`outloop=True`), or the loop
    (the process started as `python <script>`, not a wrapper that merely names it)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["pid", "cmdline"]):
            argv = process.info["cmdline"] or []
            if not any(marker in part for part in argv):
                continue
            is_outloop = len(argv) > 2 and argv[1].endswith("/outloop") and argv[2] == "run"
            is_loop = len(argv) >= 2 and "python" in os.path.basename(argv[0]) and marker in argv[1]
            if (is_outloop if outloop else is_loop):
                return int(process.info["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no process with {marker!r} appeared")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, from /proc/<pid>/stat (utime and stime)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    fields = stat[stat.rfind(b")") + 2:].split()  # the command name may hold spaces or ')'
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
