"""Hostile child, supervision: outliving the run, or keeping it from ending.

Double forks, setsid and ignored SIGTERM are covered in tests/test_run_exit_codes.py (named in THREATS.md);
these are the escapes that suite did not try.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid

from conftest import World
from operator_support import wait_for

from adversarial.conftest import run_hostile


def _processes_running(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_all(marker: str) -> None:
    """Test clean-up if the escape worked: the same tight SIGKILL sweep the supervisor uses."""
    deadline = time.monotonic() + 5
    while (pids := _processes_running(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


HOPPER_LOOP = """
    import os, signal, sys, time
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        generation = 0
        while True:
            # A new session and a new pid every generation: no process group or pid stays put long enough to aim at.
            if os.getpid() != os.getsid(0):
                os.setsid()
            generation += 1
            if generation % 50 == 0:
                with open(sys.argv[1], "w") as handle:
                    handle.write(str(generation))
            if os.fork():
                os._exit(0)
    while not os.path.exists(sys.argv[1]):  # the hopper is on its own before the loop exits
        time.sleep(0.01)
"""


def test_a_fork_and_exit_loop_does_not_outlive_the_run(world: World) -> None:
    marker = f"hopper-{uuid.uuid4().hex}"
    progress = world.work / marker
    try:
        result = run_hostile(world, HOPPER_LOOP, str(progress),
                             flags=["--summary-json", str(world.work / "summary.json")])
        assert result.code == 0, result.err
        assert progress.exists(), "the hopper never ran"
        for _ in range(5):  # a /proc scan can miss a process forked behind it; its progress mark cannot hide
            before = progress.read_text()
            assert _processes_running(marker) == []
            assert progress.read_text() == before, "the hopper is still forking after the run ended"
        # The hoppers died with the loop's PID namespace; outloop's own sweep had nothing left to count.
        assert "dies with outloop" in json.loads((world.work / "summary.json").read_text())["sandbox"]["processes"]
    finally:
        _kill_all(marker)


IN_FLIGHT_LOOP = """
    import os, sys, threading, time
    from outloop_cli.client import Outloop
    threading.Thread(target=lambda: Outloop().request("crm", "GET", "/hang?seconds=120"), daemon=True).start()
    while not os.path.exists(sys.argv[1]):  # until the test saw it reach an upstream that waits two minutes
        time.sleep(0.01)
    os._exit(3)
"""


def test_a_request_left_in_flight_does_not_hold_the_run_open(world: World) -> None:
    go, results = world.work / "go", []
    started = time.monotonic()
    runner = threading.Thread(target=lambda: results.append(run_hostile(world, IN_FLIGHT_LOOP, str(go))))
    runner.start()
    wait_for(lambda: any(request.path.startswith("/hang") for request in world.upstream.requests))
    go.touch()
    runner.join(timeout=60)
    result = results[0]
    assert result.code == 3
    assert time.monotonic() - started < 10  # not the 60 s aiohttp would wait for the handler by default
    request, response = (e for e in world.events(kind=None) if e["kind"] in ("request", "response"))
    assert (request["decision"], request["path"]) == ("allow", "/hang")
    assert response["request_seq"] == request["seq"]
    assert response["error"] in ("run_ended", "client_disconnected")
