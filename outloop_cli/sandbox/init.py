"""The first process inside the child's sandbox: build the namespaces and the view, then run the loop.

It runs as `python -m outloop_cli.sandbox.init [options] -- COMMAND...` and imports only the standard library,
because its start-up time is paid by every sandboxed run.

Two jobs, either or both:
- `--view JSON` (outloop's own namespaces, the fallback when bubblewrap is missing): unshare a user, mount, PID,
  IPC, UTS (and network) namespace; forbid nested user namespaces; fork the PID namespace's init, which builds the
  view (docs/SANDBOX.md), starts the loop in it and reaps; the whole namespace dies with this process, and this
  process dies with outloop.
- `--relay PORT SOCKET` (repeatable): inside an isolated network, listen on 127.0.0.1:PORT in the child's
  namespace and hand the listening socket to the broker over its Unix SOCKET, before the loop starts: the
  base-URL listener (the broker still demands the token) and the egress proxy. The broker accepts on them itself.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys

from outloop_cli.sandbox.relay_start import (
    EXIT_SANDBOX_FAILED,
    RELAY_SIGNALS,
    exit_code,
    exit_like,
    hand_over,
    listen,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYSCALLS = {"x86_64": {"pivot_root": 155, "mount_setattr": 442}, "aarch64": {"pivot_root": 41, "mount_setattr": 442}}
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"
MAX_USER_NAMESPACES_FILE = "/proc/sys/user/max_user_namespaces"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")  # what bubblewrap's --proc covers too

_libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded; find_library would spawn ldconfig


class SandboxSetupError(Exception):
    """A namespace step failed; the run must not go on without the layer it promised."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxSetupError(f"{what}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def die_with_parent(parent: int) -> None:
    """SIGKILL when the parent goes, even if it is SIGKILLed; and if it already went, go now.

    Asked through the host's /proc: in a new PID namespace getppid() says 0 for a parent outside it."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set parent-death signal")
    if not os.path.exists(f"/proc/{parent}/task"):
        os._exit(EXIT_SANDBOX_FAILED)


def unshare_namespaces(isolate_network: bool) -> None:
    """New user, mount, PID, IPC, UTS (and network) namespaces; uid and gid keep their identity (root stays 0,
    held in a user namespace where it owns nothing on the host), and no user namespace can be nested below."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags | (CLONE_NEWNET if isolate_network else 0)), "unshare")
    _write("/proc/self/setgroups", "deny")  # after unshare even root maps only its own ids, and needs this
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _write(MAX_USER_NAMESPACES_FILE, "0")  # this namespace's own limit: nothing the loop runs can make one
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    if isolate_network:
        _bring_loopback_up()


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


# ----- the view ----------------------------------------------------------------------------------------------


class ViewBuilder:
    """Apply outloop_cli.sandbox.view's mounts: under a fresh tmpfs root (`stage`), or over / (host view)."""

    def __init__(self, mounts: list[list[str]], stage: str | None) -> None:
        self.mounts = mounts
        self.root = stage or ""
        # Sources are opened first: in the host view a mask may cover the source of a later bind.
        self.sources = {src: os.open(src, os.O_PATH | os.O_CLOEXEC) for kind, _dest, src in mounts
                        if kind in ("ro", "rw") and src != "/"}
        self.null = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
        self.syscalls = SYSCALLS.get(os.uname().machine, {})

    def build(self) -> None:
        if self.root:
            os.makedirs(self.root, exist_ok=True)
            _check(_libc.mount(b"tmpfs", self.root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
                   "new root")
        for kind, dest, source in self.mounts:
            getattr(self, "_" + kind.replace("-", "_"))(self.root + dest, source)
        for fd in (*self.sources.values(), self.null):
            os.close(fd)
        if self.root:
            self._pivot()

    def _ro(self, dest: str, source: str) -> None:
        self._bind(dest, source)
        self._read_only(dest, recursive=True)

    def _rw(self, dest: str, source: str) -> None:
        if source != "/" or self.root:
            self._bind(dest, source)

    def _bind(self, dest: str, source: str) -> None:
        fd = self.sources.get(source)
        path = f"/proc/self/fd/{fd}" if fd is not None else source
        self._mountpoint(dest, directory=os.path.isdir(path))
        _check(_libc.mount(path.encode(), dest.encode(), None, MS_BIND | MS_REC, None), f"bind {source}")

    def _tmpfs(self, dest: str, _source: str) -> None:
        self._mountpoint(dest, directory=True)
        _check(_libc.mount(b"tmpfs", dest.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
               f"tmpfs {dest}")

    def _null(self, dest: str, _source: str) -> None:
        self._mountpoint(dest, directory=False)
        _check(_libc.mount(f"/proc/self/fd/{self.null}".encode(), dest.encode(), None, MS_BIND, None),
               f"mask {dest}")

    def _symlink(self, dest: str, target: str) -> None:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(target, dest)

    def _dev(self, dest: str, _source: str) -> None:
        self._tmpfs(dest, "")
        for name in DEVICES:
            self._mountpoint(f"{dest}/{name}", directory=False)
            _check(_libc.mount(f"/dev/{name}".encode(), f"{dest}/{name}".encode(), None, MS_BIND, None),
                   f"/dev/{name}")
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"{dest}/{name}")
        os.mkdir(f"{dest}/shm", 0o1777)
        os.chmod(f"{dest}/shm", 0o1777)
        os.mkdir(f"{dest}/pts")
        _check(_libc.mount(b"devpts", f"{dest}/pts".encode(), b"devpts", MS_NOSUID | MS_NOEXEC,
                           b"newinstance,ptmxmode=0666,mode=620"), "/dev/pts")

    def _proc(self, dest: str, _source: str) -> None:
        self._mountpoint(dest, directory=True)
        _check(_libc.mount(b"proc", dest.encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "/proc")
        for name in PROC_READ_ONLY:  # host-wide settings (IRQ affinity, PCI config space), which a held root
            # would pass the owner check of
            path = f"{dest}/{name}"
            if os.path.exists(path):
                _check(_libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), path)
                self._read_only(path, recursive=True)

    def _remount_ro(self, dest: str, _source: str) -> None:
        self._read_only(dest or "/", recursive=False)

    def _read_only(self, path: str, *, recursive: bool) -> None:
        """mount_setattr (Linux 5.12+) makes a whole tree read-only and keeps the flags the kernel locked."""
        number = self.syscalls.get("mount_setattr")
        if number is not None:
            attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)
            if _libc.syscall(number, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0, attr,
                             len(attr)) == 0:
                return
        flags = os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _check(_libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None),
               f"read-only {path}")

    def _mountpoint(self, path: str, *, directory: bool) -> None:
        if os.path.lexists(path):
            return
        os.makedirs(path if directory else os.path.dirname(path), exist_ok=True)
        if not directory:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    def _pivot(self) -> None:
        number = self.syscalls.get("pivot_root")
        if number is None:
            raise SandboxSetupError(f"pivot_root: unknown on {os.uname().machine}")
        os.chdir(self.root)
        _check(_libc.syscall(number, b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.chdir("/")


def drop_capabilities() -> None:
    """Nothing to wield: an empty bounding set (root keeps uid 0 but gains no capability at exec), no_new_privs."""
    with open(CAP_LAST_CAP_FILE) as handle:
        last = int(handle.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capability bounding set")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def pid_namespace_init(parent: int, view: dict[str, object], command: list[str], cwd: str) -> None:
    """PID 1: build the view, start the loop as PID 2, reap orphans; exit (taking the namespace) with the loop."""
    for sig in RELAY_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)  # an init ignores what it has no handler for: outloop signals PID 2
    try:
        die_with_parent(parent)
        mounts = view.get("mounts", [])
        stage = view.get("stage")
        ViewBuilder(mounts if isinstance(mounts, list) else [], stage if isinstance(stage, str) else None).build()
        os.chdir(cwd)
        drop_capabilities()
    except (SandboxSetupError, OSError) as exc:
        print(f"outloop: sandbox set-up failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SANDBOX_FAILED)
    loop = os.fork()
    if loop == 0:
        try:
            os.execv(command[0], command)
        except OSError as exc:
            print(f"outloop: cannot execute {command[0]}: {exc.strerror}", file=sys.stderr)
            os._exit(126)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == loop:
            os._exit(exit_code(status))


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="outloop-sandbox-init")
    parser.add_argument("--view", help="the mounts as JSON; builds outloop's own namespaces")
    parser.add_argument("--probe", action="store_true", help="build the namespaces only, to test this machine")
    parser.add_argument("--isolate-network", action="store_true")
    parser.add_argument("--chdir", default=".")
    parser.add_argument("--relay", nargs=2, metavar=("PORT", "SOCKET"), action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(args)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("no command")
    for sig in RELAY_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # outloop signals the loop itself; we outlive it to report its end
    own_namespaces = options.view is not None or options.probe
    try:
        if own_namespaces:
            die_with_parent(os.getppid())
            unshare_namespaces(isolate_network=options.isolate_network or options.probe)
        for port, path in options.relay:  # before the loop exists: the broker's first connection on `path` is ours
            hand_over(listen(int(port)), path)
    except (SandboxSetupError, OSError) as exc:
        print(f"outloop: sandbox set-up failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SANDBOX_FAILED)
    if own_namespaces:
        view = json.loads(options.view) if options.view else {"mounts": [["proc", "/proc", ""]]}
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            pid_namespace_init(me, view, command, options.chdir)
    else:
        pid = os.posix_spawn(command[0], command, dict(os.environ), setsigdef=list(RELAY_SIGNALS))
    exit_like(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    main()
