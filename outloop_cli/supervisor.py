"""Start the child in a session of its own with a stripped environment, and watch its whole tree.

Its own session means no controlling terminal: nothing it does can push input into the operator's terminal
(TIOCSTI). Ctrl-C still stops the run: the terminal signals outloop, which forwards. Signals are forwarded, a
timeout kills the tree (TERM, grace, KILL), and strays left at exit are killed and counted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    import psutil

from outloop_cli.errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_TIMEOUT, OutloopError, SandboxError
from outloop_cli.linux import join_anonymous_session_keyring, set_child_subreaper

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2)
KILL_GRACE_SECONDS = 5.0
STRAY_GRACE_SECONDS = 1.0
MEMORY_SAMPLE_SECONDS = 0.25


class CommandNotFound(OutloopError):
    exit_code = EXIT_NOT_FOUND


class CommandNotExecutable(OutloopError):
    exit_code = EXIT_NOT_EXECUTABLE


def child_environment(
    environ: Mapping[str, str], keep: Sequence[str], set_vars: Mapping[str, str], outloop_vars: Mapping[str, str]
) -> dict[str, str]:
    """Only `env_keep` (globs allowed) and `env_set`, then outloop's own variables, which nothing overrides."""
    env = {name: value for name, value in environ.items()
           if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep)}
    env.update(set_vars)
    env.update(outloop_vars)
    return env


def resolve_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The executable's path, looked up on the *child's* PATH; 127 when missing, 126 when not executable."""
    if not argv:
        raise CommandNotFound("no command given: write it after `--`, e.g. `outloop run -- python loop.py`")
    name = argv[0]
    if "/" in name:
        candidates = [Path(name).absolute()]  # wrappers (bwrap, prlimit) would search PATH for "loop.sh"
    else:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        if found:
            return found
        candidates = [Path(d) / name for d in env.get("PATH", os.defpath).split(os.pathsep) if d]
    for candidate in candidates:
        if candidate.exists():
            if candidate.is_dir() or not os.access(candidate, os.X_OK):
                raise CommandNotExecutable(f"{name}: permission denied or not an executable file")
            return str(candidate)
    raise CommandNotFound(f"{name}: command not found")


@dataclass(frozen=True)
class ChildResult:
    exit_code: int
    signal: int | None
    timed_out: bool
    strays_killed: int
    peak_rss_bytes: int
    cpu_seconds: float
    duration: float


class Supervisor:
    """Owns the child process tree of one run. Use from the event loop's thread."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], timeout: float | None,
                 wrapped: bool = False) -> None:
        """`wrapped`: argv starts with a sandbox wrapper (bubblewrap) that must outlive the loop to report its
        exit code, so signals skip it and go to the processes inside."""
        self.argv = list(argv)
        self.wrapped = wrapped
        self.env = dict(env)
        self.timeout = timeout
        self.pid = 0
        self._status: int | None = None
        self._timed_out = False
        self._exited: asyncio.Event | None = None
        self._tree_empty = threading.Event()
        self._kill_timer: asyncio.TimerHandle | None = None
        self._peak_rss = 0
        self._held: dict[int, Any] | None = None  # the handlers spawn() replaced, while it holds the signals
        self._arrived: list[int] = []  # signals held since spawn(), forwarded once wait() can
        self._exit_lock = threading.Lock()
        self._exit_callbacks: list[Callable[[], None]] = []

    def spawn(self, executable: str) -> int:
        set_child_subreaper()
        withhold_inherited_fds()
        if not join_anonymous_session_keyring():
            raise SandboxError("cannot give the loop an empty session keyring (keyctl refused, e.g. the key quota "
                               "is used up): it would inherit the keys of the session that started outloop")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._cpu_before = usage.ru_utime + usage.ru_stime
        self._started = time.monotonic()
        # Held until wait() can forward them (the event loop is made after the spawn, while the child starts): one
        # arriving in between would otherwise stop outloop without the child hearing of it. A handler, not a
        # blocked mask: the process's other threads (the audit writer's) would still take a blocked signal.
        self._held = {sig: signal.signal(sig, self._hold) for sig in FORWARDED_SIGNALS}
        try:
            self.pid = os.posix_spawn(
                executable, self.argv, self.env, setsid=True,
                setsigdef=[*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGCHLD],
            )
        except OSError as exc:  # E2BIG, ENOEXEC, EACCES on an interpreter line...
            self.release_signals()
            raise CommandNotExecutable(f"{self.argv[0]}: cannot execute: {exc.strerror}") from None
        return self.pid

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call `callback` as soon as the child's exit is seen, on the reaper's thread (at once if it was seen
        already): work that only matters while the child runs stops without waiting for the event loop to hear."""
        with self._exit_lock:
            if self._status is None:
                self._exit_callbacks.append(callback)
                return
        callback()

    def release_signals(self) -> None:
        """Give the forwarded signals back the handlers spawn() found, where wait() never replaced them (the run
        failed before its event loop ran). Idempotent, so the run's clean-up can call it on every path."""
        if self._held is not None:
            for sig, handler in self._held.items():
                signal.signal(sig, handler)
            self._held = None

    def _hold(self, sig: int, _frame: object) -> None:
        self._arrived.append(sig)

    def wait(self) -> Coroutine[Any, Any, ChildResult]:
        """Reap and forward signals from now on (called in the running loop), and return what awaits the end.

        The set-up happens at the call, not at the first await: the run starts its other work (the broker stack's
        import) right after, and the child's exit must not wait behind it to be noticed.
        """
        import asyncio  # loaded after the spawn, while the child starts (see runner._start)

        loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        threading.Thread(target=self._reap_forever, args=(loop,), name="outloop-reaper", daemon=True).start()
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._forward, sig)
        self._held = None  # the loop's handlers replaced spawn()'s; what they held goes to the child now
        for early in self._arrived:
            self._forward(early)
        timer = loop.call_later(self.timeout, self._on_timeout) if self.timeout else None
        sampler = asyncio.ensure_future(self._sample_memory())
        return self._until_exit(loop, timer, sampler)

    async def _until_exit(self, loop: asyncio.AbstractEventLoop, timer: asyncio.TimerHandle | None,
                          sampler: asyncio.Future[None]) -> ChildResult:
        assert self._exited is not None
        try:
            await self._exited.wait()
        finally:
            sampler.cancel()
            for handle in (timer, self._kill_timer):
                if handle is not None:
                    handle.cancel()
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)
        strays = await loop.run_in_executor(None, self._kill_strays)
        return self._result(strays)

    # ----- internals -------------------------------------------------------------------------------------

    async def _sample_memory(self) -> None:
        """Peak of the tree's summed high-water marks. getrusage's ru_maxrss cannot serve: a child spawned by
        a Python process inherits the parent's RSS as its own high-water mark until it execs."""
        import asyncio

        while True:
            self._peak_rss = max(self._peak_rss, sum(_high_water(pid) for pid in _tree_pids()))
            await asyncio.sleep(MEMORY_SAMPLE_SECONDS)

    def _reap_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reap every child, including adopted orphans, until the tree is empty (ECHILD)."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._tree_empty.set()
                return
            except InterruptedError:
                continue
            if pid == self.pid:
                with self._exit_lock:
                    self._status = status
                    callbacks, self._exit_callbacks = self._exit_callbacks, []
                for callback in callbacks:
                    callback()
                assert self._exited is not None
                loop.call_soon_threadsafe(self._exited.set)

    def _forward(self, sig: int) -> None:
        if self.wrapped:
            for pid in _tree_pids():
                if pid != self.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _on_timeout(self) -> None:
        import asyncio

        self._timed_out = True
        self._forward(signal.SIGTERM)
        self._kill_timer = asyncio.get_running_loop().call_later(KILL_GRACE_SECONDS, self._signal_tree,
                                                                 signal.SIGKILL)

    def _signal_tree(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for pid in _tree_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _kill_strays(self) -> int:
        """Kill whatever the child left behind: TERM, a short grace, then KILL; return how many there were."""
        if _descendant_pids() == []:
            return 0  # the common case, answered without loading psutil
        import psutil

        strays = _descendants()
        seen = {process.pid for process in strays} | set(_descendant_pids() or ())
        if not seen:
            return 0
        for process in strays:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(strays, timeout=STRAY_GRACE_SECONDS)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        _kill_until_gone(time.monotonic() + KILL_GRACE_SECONDS)
        self._tree_empty.wait(timeout=KILL_GRACE_SECONDS)
        return len(seen)

    def _result(self, strays: int) -> ChildResult:
        status = self._status if self._status is not None else 0
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if self._timed_out:
            code = EXIT_TIMEOUT
        elif sig is not None:
            code = 128 + sig
        else:
            code = os.waitstatus_to_exitcode(status)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ChildResult(
            exit_code=code, signal=sig, timed_out=self._timed_out, strays_killed=strays,
            peak_rss_bytes=self._peak_rss,
            cpu_seconds=usage.ru_utime + usage.ru_stime - self._cpu_before,
            duration=time.monotonic() - self._started,
        )


def withhold_inherited_fds() -> None:
    """Only fds 0-2 reach the child: whatever else the process that started outloop left open (a socket, a
    secret file) becomes close-on-exec. outloop's own fds are close-on-exec already (PEP 446)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _high_water(pid: int) -> int:
    """VmHWM of one process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants() -> list[psutil.Process]:
    import psutil  # loaded only when strays need it: a clean run never does

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _tree_pids() -> list[int]:
    pids = _descendant_pids()
    return pids if pids is not None else [process.pid for process in _descendants()]


def _descendant_pids() -> list[int] | None:
    """Pids under this process, from /proc/<pid>/task/<tid>/children; None where the kernel has no such file.

    Fast on purpose (microseconds, where psutil reads every process on the host): a process that forks and exits
    in a loop changes pid faster than a slow listing can aim at it, and psutil's snapshot misses it entirely.
    """
    me = os.getpid()
    if not os.path.exists(f"/proc/{me}/task/{me}/children"):
        return None
    found: list[int] = []
    todo = [me]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone already
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _kill_until_gone(deadline: float) -> None:
    """SIGKILL sweeps until nothing is left (or the deadline): late orphans, and fork-and-exit loops.

    One sweep loses to a process that forks and exits continuously; a tight series of fast ones wins within
    milliseconds, because a SIGKILL that lands during fork() kills the process before the copy exists.
    """
    while time.monotonic() < deadline:
        pids = _descendant_pids()
        if pids is None:  # no children files (not Linux): one psutil sweep is the best there is
            for process in _descendants():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(process.pid, signal.SIGKILL)
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
