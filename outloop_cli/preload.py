"""Import a heavy module on a side thread while the caller does other work, and stop it when nobody needs it.

`outloop run` imports the broker stack this way from the moment the child is spawned: the import uses the time the
child spends starting, so its first request waits for what is left of the import rather than all of it, and a child
that exits without calling the broker (`run -- true`) cancels the import, which stops at its next import statement
rather than competing with the run's own end for the interpreter's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _Cancelled(BaseException):
    """Raised inside the side thread's import; a BaseException so `except ImportError` fallbacks cannot swallow it
    and leave a half-imported package behind under its real name."""


class BackgroundImport:
    """`importlib.import_module(name)` on a daemon thread, awaitable from an event loop, cancellable.

    A daemon thread, so an error path that never reaches `stop` still lets the interpreter exit.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._done = False
        self._cancelled = False
        self._module: ModuleType | None = None
        self._failed = False
        self._waiters: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._work, name=f"outloop-import-{name}", daemon=True)
        # Rebound, never mutated: another thread may be iterating the old list in the middle of an import.
        sys.meta_path = [_CancelPoint(self), *sys.meta_path]
        self._thread.start()

    def cancel(self) -> None:
        """Stop the import at its next import statement; modules it already finished stay imported."""
        self._cancelled = True

    def stop(self) -> None:
        """Cancel, and wait until the side thread has left the import.

        A daemon thread still inside an import when the interpreter finalizes can crash the process as it exits
        (a run whose loop exited 0 once ended in SIGSEGV that way). Waiting costs at most the rest of the module
        body being executed: the import stops at its next import statement.
        """
        self.cancel()
        self._thread.join()

    def stops_here(self) -> bool:
        return self._cancelled and threading.current_thread() is self._thread

    async def module(self) -> ModuleType | None:
        """The imported module, or None where a cancel stopped the import. Where the side thread failed (e.g.
        importlib's deadlock guard tripping over an import the main thread made at the same moment), imports it
        here, so a real ImportError surfaces."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: its run ended without needing the module
                loop.call_soon_threadsafe(_resolve, finished)

        with self._lock:
            if self._done:
                finished.set_result(None)
            else:
                self._waiters.append(wake)
        await finished
        if self._module is None and self._cancelled:
            return None
        if self._module is None or self._failed:
            return importlib.import_module(self.name)
        return self._module

    def _work(self) -> None:
        try:
            self._module = importlib.import_module(self.name)
        except _Cancelled:
            pass
        except Exception:
            self._failed = True  # module() imports it again where the error can be reported
        finally:
            sys.meta_path = [finder for finder in sys.meta_path
                             if not (isinstance(finder, _CancelPoint) and finder.owner is self)]
            with self._lock:
                self._done = True
                waiters, self._waiters = self._waiters, []
            for wake in waiters:
                wake()


class _CancelPoint:
    """A meta-path finder that finds nothing: it only raises in its owner's thread once that was cancelled."""

    def __init__(self, owner: BackgroundImport) -> None:
        self.owner = owner

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        if self.owner.stops_here():
            raise _Cancelled
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
