"""The end of the run holds even when outloop itself is killed: the loop's whole tree dies with it, and the exit
code says how the loop died whichever wrappers run (the base-URL relay included).

Here rather than in tests/adversarial/: a SIGKILLed outloop leaves its run without an end record, by design.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import uuid

import psutil
import pytest
from conftest import World
from operator_support import wait_for
from sandbox_support import BACKENDS, OPERATORS, find_process, operator, use_backend

pytestmark = pytest.mark.sandbox


ORPHAN_LOOP = """
    import os, subprocess, sys, time
    if os.fork() == 0:
        os.setsid()
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", sys.argv[1]])
        os._exit(0)
    while not any(sys.argv[1] in open(f"/proc/{p}/cmdline").read() for p in os.listdir("/proc") if p.isdigit()
                  and os.path.exists(f"/proc/{p}/cmdline") and int(p) != os.getpid()):
        time.sleep(0.05)
    open(sys.argv[2], "w").close()
    time.sleep(300)
"""


def _survivors(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        argv = process.info["cmdline"] or []
        if marker in argv and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(int(process.info["pid"]))
    return found


@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loops_whole_tree_dies_when_outloop_is_sigkilled(world: World, backend: str, who: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    script = world.work / "orphan.py"
    script.write_text(textwrap.dedent(ORPHAN_LOOP))
    op.give(script)
    marker, ready = f"orphan-{uuid.uuid4().hex[:8]}", world.work / "ready"
    argv = [op.outloop, "run", "-w", "acme", "--profiles", str(world.profiles), "--", op.python, str(script),
            marker, str(ready)]
    process = subprocess.Popen(op.command(argv), env=op.env, cwd=world.work, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(ready.exists)
    os.kill(find_process(script.name, outloop=True), signal.SIGKILL)
    process.wait(timeout=30)
    wait_for(lambda: _survivors(marker) == [], timeout=10)

    ready.unlink()
    control = subprocess.Popen(op.command([op.python, str(script), marker, str(ready)]), env=op.env, cwd=world.work)
    wait_for(ready.exists)
    os.kill(find_process(script.name), signal.SIGKILL)
    control.wait(timeout=30)
    survivors = _survivors(marker)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors != []


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "no-relay"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loop_killed_by_sigkill_exits_137_with_the_relay_on_or_off(world: World, backend: str, relay: bool) -> None:
    use_backend(world, backend)
    world.write_profile("acme", f"""
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "{{UPSTREAM}}"
        allow = ["GET /**"]
        {'child_env = { CRM_URL = "{url}", CRM_TOKEN = "{token}" }' if relay else ''}
    """)
    world.set_keyring("acme", "crm", world.canaries["acme"])
    result = world.run("sh", "-c", "kill -KILL $$", flags=["--summary-json", str(world.work / "summary.json")])
    assert result.code == 137, result.err
    assert "Traceback" not in result.err
    assert ("CRM_URL" in result.err) is False
