"""The run's side-thread import of the broker stack: it delivers the module, stops at its next import statement
once cancelled (even inside a package's `except ImportError` fallback), and leaves no half-imported package and
no import hook behind.

The package under import waits on a gate the test opens, so where the import stands is known, never guessed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from outloop_cli.preload import BackgroundImport

PACKAGE = """
import preload_gate
preload_gate.reached.set()
preload_gate.release.wait(30)
try:
    from {name} import sub
except ImportError:  # a fallback of the kind aiohttp has for its C extensions: must not swallow a cancel
    sub = None
"""


@pytest.fixture
def gated(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, types.ModuleType]]:
    name = f"gated_{request.node.name.replace('[', '_').replace(']', '_')}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text(PACKAGE.format(name=name))
    (package / "sub.py").write_text("VALUE = 42\n")
    gate = types.ModuleType("preload_gate")
    gate.reached, gate.release = threading.Event(), threading.Event()  # type: ignore[attr-defined]
    sys.modules["preload_gate"] = gate
    sys.path.insert(0, str(tmp_path))
    try:
        yield name, gate
    finally:
        gate.release.set()
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.") or m == "preload_gate"]:
            del sys.modules[module]


def side_thread(name: str) -> threading.Thread:
    return next(thread for thread in threading.enumerate() if thread.name == f"outloop-import-{name}")


def no_hook_left() -> bool:
    return not any(type(finder).__name__ == "_CancelPoint" for finder in sys.meta_path)


def test_the_module_arrives_whole_when_nobody_cancels(gated: tuple[str, types.ModuleType]) -> None:
    name, gate = gated
    stack = BackgroundImport(name)
    assert gate.reached.wait(30)
    gate.release.set()
    module = asyncio.run(stack.module())
    assert module is not None and module.sub.VALUE == 42
    assert no_hook_left()  # removed before the waiters are woken


def test_a_cancelled_import_stops_at_its_next_import_and_leaves_nothing_half_done(
        gated: tuple[str, types.ModuleType]) -> None:
    name, gate = gated
    BackgroundImport(name).cancel()  # cancelled before its package could import anything of its own
    assert gate.reached.wait(30)
    thread = side_thread(name)
    gate.release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert name not in sys.modules and f"{name}.sub" not in sys.modules
    assert no_hook_left()


def test_a_cancelled_import_is_awaited_as_none_and_never_finished_on_the_awaiting_thread(
        gated: tuple[str, types.ModuleType]) -> None:
    """The run cancels from the reaper's thread while the event loop may already await the module: it must get
    None, not the broker stack imported on the loop's own thread after all."""
    name, gate = gated
    stack = BackgroundImport(name)
    assert gate.reached.wait(30)
    stack.cancel()
    gate.release.set()
    assert asyncio.run(stack.module()) is None
    assert name not in sys.modules and f"{name}.sub" not in sys.modules
    assert no_hook_left()


def test_stop_returns_only_once_the_side_thread_has_left_the_import(gated: tuple[str, types.ModuleType]) -> None:
    """Interpreter exit must never find the side thread inside an import: `outloop run` stops it before returning."""
    name, gate = gated
    stack = BackgroundImport(name)
    assert gate.reached.wait(30)
    stopping = threading.Thread(target=stack.stop)
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive()  # the module body is still running: stop() waits for it
    gate.release.set()
    stopping.join(30)
    assert not stopping.is_alive() and not side_thread_alive(name)
    assert name not in sys.modules and no_hook_left()


def side_thread_alive(name: str) -> bool:
    return any(thread.name == f"outloop-import-{name}" for thread in threading.enumerate())


def test_a_cancel_touches_no_other_threads_imports(gated: tuple[str, types.ModuleType]) -> None:
    name, gate = gated
    stack = BackgroundImport(name)
    assert gate.reached.wait(30)
    stack.cancel()
    import json.tool  # noqa: F401  (the main thread imports while the side thread's cancel is pending)

    gate.release.set()
    side_thread(name).join(30)
    assert "json.tool" in sys.modules and name not in sys.modules


def test_a_module_that_cannot_be_imported_fails_where_it_is_awaited() -> None:
    stack = BackgroundImport("outloop_cli_no_such_module")
    with pytest.raises(ModuleNotFoundError, match="outloop_cli_no_such_module"):
        asyncio.run(stack.module())
