"""The relay's first steps inside bubblewrap's namespaces, and how a wrapper exits like the loop it ran.

With the egress proxy on by default, every isolated run starts the relay, and the loop starts only after it:
so this module imports nothing but the interpreter's built-in C modules (`_signal`, `_socket`), and the relay is
started as `python -I -S -c ...` (no site, no environment: `namespaces.relay_command`). The loop is spawned
as soon as the listeners exist; `relay.py`, the part that imports `selectors` and `socket`, loads while it runs.
Connections made meanwhile wait in the listen backlog. `init.py` shares the signal list, the listener and the
exit helpers.
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
    """A listening socket on 127.0.0.1:`port` of this network namespace, as a descriptor for `relay.py`."""
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


def main(args: Sequence[str]) -> None:
    try:
        relays, command = parse(args)
        for sig in RELAY_SIGNALS:
            _signal.signal(sig, _signal.SIG_IGN)
        listeners = [(listen(port), path) for port, path in relays]
    except (ValueError, OSError) as exc:
        print(f"outloop: sandbox set-up failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SANDBOX_FAILED)
    try:
        pid = os.posix_spawn(command[0], command, dict(os.environ), setsigdef=RELAY_SIGNALS)
    except OSError as exc:
        print(f"outloop: cannot execute {command[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    from outloop_cli.sandbox.relay import relay_until_exit  # selectors and socket: loaded while the loop runs

    relay_until_exit(listeners, pid, exit_like)
