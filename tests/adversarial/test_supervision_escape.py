"""Hostile child, supervision: outliving the run, or keeping it from ending.

Double forks, setsid and ignored SIGTERM are covered in tests/test_run_exit_codes.py (named in THREATS.md);
these are the escapes that suite did not try.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid

from conftest import World

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
    time.sleep(0.5)
"""


def test_a_fork_and_exit_loop_does_not_outlive_the_run(world: World) -> None:
    marker = f"hopper-{uuid.uuid4().hex}"
    progress = world.work / marker
    try:
        result = run_hostile(world, HOPPER_LOOP, str(progress),
                             flags=["--summary-json", str(world.work / "summary.json")])
        assert result.code == 0, result.err
        assert progress.exists(), "the hopper never ran"
        time.sleep(0.3)
        before = progress.read_text()
        time.sleep(0.5)
        assert progress.read_text() == before, "the hopper is still forking after the run ended"
        assert _processes_running(marker) == []
        # The hoppers died with the loop's PID namespace; outloop's own sweep had nothing left to count.
        assert "dies with outloop" in json.loads((world.work / "summary.json").read_text())["sandbox"]["processes"]
    finally:
        _kill_all(marker)


IN_FLIGHT_LOOP = """
    import os, threading, time
    from outloop_cli.client import Outloop
    threading.Thread(target=lambda: Outloop().request("crm", "GET", "/hang?seconds=120"), daemon=True).start()
    time.sleep(0.5)  # the request is on its way to an upstream that will not answer for two minutes
    os._exit(3)
"""


def test_a_request_left_in_flight_does_not_hold_the_run_open(world: World) -> None:
    started = time.monotonic()
    result = run_hostile(world, IN_FLIGHT_LOOP)
    assert result.code == 3
    assert time.monotonic() - started < 10  # not the 60 s aiohttp would wait for the handler by default
    request, response = (e for e in world.events(kind=None) if e["kind"] in ("request", "response"))
    assert (request["decision"], request["path"]) == ("allow", "/hang")
    assert response["request_seq"] == request["seq"]
    assert response["error"] in ("run_ended", "client_disconnected")
