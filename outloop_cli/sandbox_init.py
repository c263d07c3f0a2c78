"""The first process inside the child's sandbox: finish the namespace set-up, then become (or relay for) the loop.

It runs as `python -m outloop_cli.sandbox_init [options] -- COMMAND...` and imports only the standard library,
because its start-up time is paid by every sandboxed run.

Two jobs, either or both:
- `--unshare`: create the namespaces itself (the fallback when bubblewrap is missing): a user namespace when not
  root, a mount and a network namespace; bring `lo` up; mask hidden paths; drop root's capabilities.
- `--relay PORT SOCKET` (repeatable): inside an isolated network, listen on 127.0.0.1:PORT in the child's
  namespace and pipe every connection to the broker's Unix SOCKET: the base-URL listener (the broker still
  demands the token) and the egress proxy (the broker checks the relay is in the run's tree).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import functools
import os
import signal
import socket
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 1 << 21
MS_PRIVATE = 1 << 18
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"
RELAY_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
EXIT_SANDBOX_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded; find_library would spawn ldconfig


class SandboxSetupError(Exception):
    """A namespace step failed; the run must not go on without the layer it promised."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxSetupError(f"{what}: {os.strerror(errno)}")


def unshare_namespaces(isolate_network: bool) -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | (CLONE_NEWNET if isolate_network else 0)
    if uid != 0:
        flags |= CLONE_NEWUSER  # an unprivileged user gets its own user namespace to own the others
    _check(_libc.unshare(flags), "unshare")
    if uid != 0:
        # Map our uid and gid to themselves: the loop keeps its identity, and loses the namespace's
        # capabilities at exec because it is not uid 0.
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    if isolate_network:
        _bring_loopback_up()


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def make_readonly(dirs: list[str]) -> None:
    """Bind each dir onto itself, then remount that bind read-only (before the masks, which go on top).

    In a user namespace the remount must repeat the flags the kernel locked on the original mount (nosuid,
    nodev, noexec, atime), or it is refused; statvfs says which are set.
    """
    for path in dirs:
        _check(_libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"read-only {path}")
        flags = os.statvfs(path).f_flag
        kept = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        kept |= (MS_NOATIME if flags & os.ST_NOATIME else 0) | (MS_NODIRATIME if flags & os.ST_NODIRATIME else 0)
        kept |= MS_RELATIME if flags & os.ST_RELATIME else 0
        _check(_libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None),
               f"read-only {path}")


def hide_paths(dirs: list[str], files: list[str], keep: list[str]) -> None:
    """Empty tmpfs over hidden dirs, /dev/null over hidden files; `keep` dirs (the run dir) are bound back."""
    kept = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in keep]
    for path in dirs:
        _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"),
               f"hide {path}")
    for path in files:
        _check(_libc.mount(b"/dev/null", path.encode(), None, MS_BIND, None), f"hide {path}")
    for path, fd in kept:
        os.makedirs(path, exist_ok=True)
        _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND, None), f"keep {path}")
        os.close(fd)


def drop_root_capabilities() -> None:
    """Root inside the sandbox must not be able to unmount the masks or reconfigure the network."""
    if os.getuid() != 0:
        return
    with open(CAP_LAST_CAP_FILE) as handle:
        last = int(handle.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capability bounding set")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


# ----- relay -------------------------------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof() if writer.can_write_eof() else writer.close()


async def _serve_connection(broker_socket: str, client_reader: asyncio.StreamReader,
                            client_writer: asyncio.StreamWriter) -> None:
    try:
        broker_reader, broker_writer = await asyncio.open_unix_connection(broker_socket)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(_pipe(client_reader, broker_writer), _pipe(broker_reader, client_writer))
    for writer in (client_writer, broker_writer):
        writer.close()


async def _relay_until_exit(relays: list[tuple[int, str]], argv: list[str]) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # a child hanging up mid-pipe is not news
    servers = [await asyncio.start_server(functools.partial(_serve_connection, broker_socket), "127.0.0.1", port,
                                          reuse_address=True)
               for port, broker_socket in relays]
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        for sig in RELAY_SIGNALS:
            loop.add_signal_handler(sig, lambda: None)  # the loop gets them from the process group; we outlive it
        pid = os.posix_spawn(argv[0], argv, dict(os.environ), setsigdef=list(RELAY_SIGNALS))
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        _exit_like(status)  # at once: open pipes die with us, which is what their peers should see


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        # Die the same way, so the supervisor reports 128+N for the loop, not for us.
        if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [os.WTERMSIG(status)])
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 128 + os.WTERMSIG(status))


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="outloop-sandbox-init")
    parser.add_argument("--unshare", action="store_true")
    parser.add_argument("--share-network", action="store_true")
    parser.add_argument("--hide-dir", action="append", default=[])
    parser.add_argument("--hide-file", action="append", default=[])
    parser.add_argument("--keep-dir", action="append", default=[])
    parser.add_argument("--readonly-dir", action="append", default=[])
    parser.add_argument("--relay", nargs=2, metavar=("PORT", "SOCKET"), action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(args)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("no command")
    try:
        if options.unshare:
            unshare_namespaces(isolate_network=not options.share_network)
            make_readonly(options.readonly_dir)
            hide_paths(options.hide_dir, options.hide_file, options.keep_dir)
            drop_root_capabilities()
    except (SandboxSetupError, OSError) as exc:
        print(f"outloop: sandbox set-up failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SANDBOX_FAILED)
    if not options.relay:
        os.execv(command[0], command)
    asyncio.run(_relay_until_exit([(int(port), path) for port, path in options.relay], command))


if __name__ == "__main__":
    main()
