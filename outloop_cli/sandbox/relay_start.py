"""The relay inside bubblewrap's namespaces: it opens the loop's listeners there, hands them to the broker, runs
the loop and exits like it.

Inside an isolated network the loop reaches the broker at 127.0.0.1:PORT of its own namespace (the base-URL
listener, and the egress proxy). The relay listens there and sends each listening socket to the broker over a
Unix socket (SCM_RIGHTS); the broker then accepts those connections itself, so the relay carries no traffic and
only waits for the loop. The hand-over happens before the loop is spawned, so the first connection the broker
takes on each hand-over socket is the relay's (see broker/listeners.py `take_over`).

With the egress proxy on by default, every isolated run starts the relay, and the loop starts only after it:
so this module imports nothing but the interpreter's built-in C modules (`_signal`, `_socket`), and the relay is
started as `python -I -S -c ...` (no site, no environment: `namespaces.relay_command`). `init.py` shares the
signal list, the listener, the hand-over and the exit helpers.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # `signal` without its enums (typeshed has no stub)
import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # mypy reads this; at run time `collections.abc` would cost an import for annotations only
    from collections.abc import Sequence

# Signals the wrapper ignores, so it outlives the loop to report its end; the loop gets them back as default.
RELAY_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
                 _signal.SIGUSR2)
EXIT_SANDBOX_FAILED = 125
LISTEN_BACKLOG = 1024


def listen(port: int) -> int:
    """A listening socket on 127.0.0.1:`port` of this network namespace, as a descriptor for `hand_over`."""
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(LISTEN_BACKLOG)
    return int(listener.detach())


def exit_code(status: int) -> int:
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)


def exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        # Die the same way, so the supervisor reports 128+N for the loop, not for us. SIGKILL and SIGSTOP have
        # no handler to reset, and SIGKILL needs none to kill us.
        sig = os.WTERMSIG(status)
        if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit(exit_code(status))


def parse(args: Sequence[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """`--relay PORT SOCKET`... `--` COMMAND...: what `namespaces.relay_command` writes, and nothing else."""
    relays: list[tuple[int, str]] = []
    rest = list(args)
    while rest[:1] == ["--relay"] and len(rest) >= 3 and rest[1].isdigit():
        relays.append((int(rest[1]), rest[2]))
        rest = rest[3:]
    if rest[:1] != ["--"] or len(rest) < 2 or not relays:
        raise ValueError("usage: --relay PORT SOCKET [--relay PORT SOCKET]... -- COMMAND [ARGS...]")
    return relays, rest[1:]


def hand_over(listener: int, broker_socket: str) -> None:
    """Send the listening socket to the broker over its Unix `broker_socket`, and keep no copy of it.

    A socket belongs to the network namespace it was made in, whoever holds it: the broker accepts the loop's
    connections to 127.0.0.1:PORT of this namespace itself, so no byte of them passes through this process.
    """
    channel = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        channel.connect(broker_socket)
        channel.sendmsg([b"L"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, listener.to_bytes(4, sys.byteorder))])
    finally:
        channel.close()
        os.close(listener)


def main(args: Sequence[str]) -> None:
    try:
        relays, command = parse(args)
        for sig in RELAY_SIGNALS:
            _signal.signal(sig, _signal.SIG_IGN)
        for port, path in relays:  # before the loop exists: the broker's first connection on `path` is ours
            hand_over(listen(port), path)
    except (ValueError, OSError) as exc:
        print(f"outloop: sandbox set-up failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SANDBOX_FAILED)
    try:
        pid = os.posix_spawn(command[0], command, dict(os.environ), setsigdef=RELAY_SIGNALS)
    except OSError as exc:
        print(f"outloop: cannot execute {command[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    exit_like(os.waitpid(pid, 0)[1])
