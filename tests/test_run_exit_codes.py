"""Acceptance 3 of the run path: the exit-code contract cron relies on, and a tree left with no survivors."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import psutil
import pytest
from conftest import OUTLOOP, PYTHON, World
from operator_support import wait_for


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_child_exit_code_passes_through(world: World, code: int) -> None:
    assert world.run(PYTHON, "-c", f"raise SystemExit({code})").code == code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_child_killed_by_signal_gives_128_plus_n(world: World, sig: int) -> None:
    result = world.run(PYTHON, "-c", f"import os; os.kill(os.getpid(), {int(sig)})")
    assert result.code == 128 + sig


def test_missing_command_is_127(world: World) -> None:
    result = world.run("no-such-command-xyz")
    assert result.code == 127
    assert "no-such-command-xyz: command not found" in result.err


def test_non_executable_command_is_126(world: World) -> None:
    script = world.work / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert world.run(str(script)).code == 126
    assert world.run(str(world.work)).code == 126  # a directory


def test_bad_profile_is_125_naming_file_and_key_before_the_child_starts(world: World) -> None:
    marker = world.work / "started"
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        alow = ["GET /x"]
    """)
    result = world.run("touch", str(marker))
    assert result.code == 125
    assert "acme.toml: credentials.crm.alow: unknown key; did you mean `allow`?" in result.err
    assert not marker.exists()
    assert "Traceback" not in result.err


def test_missing_secret_is_125_naming_workspace_and_credential(world: World) -> None:
    marker = world.work / "started"
    world.write_profile("acme", """
        version = 1
        [credentials.mail]
        secret = "keyring"
        base_url = "{UPSTREAM}"
    """)
    result = world.run("touch", str(marker))
    assert result.code == 125
    assert "workspace 'acme', credential 'mail': no secret in the keyring" in result.err
    assert "outloop secret set acme mail" in result.err
    assert not marker.exists()


@pytest.mark.parametrize(("profile_secret", "setup", "message"), [
    ("file:{HOME}/missing-secret", None, "cannot be read: No such file or directory"),
    ("file:{HOME}/loose-secret", "loose", "readable by group or others"),
    ("cmd:false", None, "'false' exited with code 1"),
    ("cmd:/no/such/tool show x", None, "'/no/such/tool' was not found"),
    ("env:NOT_SET_ANYWHERE", None, "NOT_SET_ANYWHERE is not set in outloop's environment"),
])
def test_unusable_secret_sources_are_125_with_a_clear_message(
    world: World, profile_secret: str, setup: str | None, message: str
) -> None:
    if setup == "loose":
        loose = world.work / "loose-secret"
        loose.write_text("value\n")
        loose.chmod(0o644)
    world.write_profile("acme", f"""
        version = 1
        [credentials.crm]
        secret = "{profile_secret.replace('{HOME}', str(world.work))}"
        base_url = "{{UPSTREAM}}"
    """)
    result = world.run("true")
    assert result.code == 125
    assert "credential 'crm'" in result.err and message in result.err
    assert "Traceback" not in result.err


def test_file_and_cmd_sources_supply_the_secret(world: World) -> None:
    secret_file = world.work.parent / "crm-secret"  # outside the working dir, which may not hold a secret
    secret_file.write_text(world.canaries["acme"] + "\n")
    secret_file.chmod(0o600)
    world.write_profile("acme", f"""
        version = 1
        [credentials.crm]
        secret = "file:{secret_file}"
        base_url = "{{UPSTREAM}}"
        allow = ["GET /a"]
        [credentials.llm]
        secret = "cmd:{PYTHON} -c 'print(\\"{world.canaries['agency']}\\")'"
        base_url = "{{UPSTREAM}}"
        allow = ["GET /b"]
    """)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        client = Outloop()
        print(client.request("crm", "GET", "/a").status, client.request("llm", "GET", "/b").status)
    """)
    assert result.out.split() == ["200", "200"], result.err
    first, second = world.upstream.requests
    assert first.header("Authorization") == f"Bearer {world.canaries['acme']}"
    assert second.header("Authorization") == f"Bearer {world.canaries['agency']}"


def test_unknown_workspace_is_125(world: World) -> None:
    result = world.run("true", workspace="initech")
    assert result.code == 125
    assert "unknown workspace 'initech'" in result.err and "acme" in result.err


def test_bad_timeout_flag_is_125(world: World) -> None:
    result = world.run("true", flags=["--timeout", "soon"])
    assert result.code == 125
    assert "--timeout" in result.err


def test_socket_path_too_long_is_125(world: World) -> None:
    deep = world.home / ("d" * 90)
    env = {**world.env, "OUTLOOP_HOME": str(deep)}
    result = world.run("true", env=env)
    assert result.code == 125
    assert "over the 107-byte limit" in result.err


TREE_THAT_RESISTS = """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:      # double fork: the grandchild is orphaned and re-parented
                os.setsid()         # and escapes the process group
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                time.sleep(300)
                os._exit(0)
            os._exit(0)
        os.waitpid(pid, 0)
    child = os.fork()
    if child == 0:
        time.sleep(300)
        os._exit(0)
    with open(sys.argv[1], "w") as handle:
        handle.write(" ".join(str(p.pid) for p in __import__("psutil").Process().children(recursive=True)))
        handle.write(" " + str(os.getpid()))
    time.sleep(300)
"""


def _pids_in(path: str) -> list[int]:
    with open(path) as handle:
        return [int(p) for p in handle.read().split()]


def test_timeout_gives_124_and_kills_the_whole_tree(world: World) -> None:
    pid_file = str(world.work / "pids")
    script = world.work / "resist.py"
    import textwrap

    script.write_text(textwrap.dedent(TREE_THAT_RESISTS))
    started = time.monotonic()
    result = world.run(PYTHON, str(script), pid_file, flags=["--timeout", "2s"], timeout=60)
    assert result.code == 124
    assert time.monotonic() - started < 30
    assert len(_pids_in(pid_file)) >= 2  # the tree was there (pids of the child's own PID namespace)
    alive = [p.pid for p in psutil.process_iter(["cmdline", "status"])
             if str(script) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_double_forked_strays_do_not_outlive_the_run(world: World) -> None:
    pid_file = world.work / "stray"
    result = world.run_loop(f"""
        import os, time
        if os.fork() == 0:
            if os.fork() == 0:
                os.setsid()
                open({str(pid_file)!r} + ".part", "w").write(str(os.getpid()))
                os.rename({str(pid_file)!r} + ".part", {str(pid_file)!r})
                time.sleep(300)
            os._exit(0)
        while not os.path.exists({str(pid_file)!r}):  # the stray is running on its own before the loop exits
            time.sleep(0.01)
    """, flags=["--summary-json", str(world.work / "summary.json")])
    assert result.code == 0
    assert pid_file.exists()  # the stray ran; its pid is one of the loop's own PID namespace
    wait_for(lambda: [p for p in psutil.process_iter(["cmdline", "status"])
                      if any(str(world.work) in arg for arg in p.info["cmdline"] or [])
                      and p.info["status"] != psutil.STATUS_ZOMBIE] == [], timeout=10)
    import json

    summary = json.loads((world.work / "summary.json").read_text())
    # The stray dies with the loop's PID namespace (the kernel kills it when the namespace's init goes); outloop's
    # own sweep counts only what it still finds and kills itself.
    assert "dies with outloop" in summary["sandbox"]["processes"]


def test_sigterm_to_outloop_is_forwarded_to_the_child(world: World) -> None:
    ready = world.work / "ready"
    script = world.work / "wait.py"
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([OUTLOOP, "run", "-w", "acme", "--profiles", str(world.profiles), "--",
                                PYTHON, str(script)], env=world.env, stderr=subprocess.PIPE, text=True,
                               cwd=world.work)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=20) == 7


def test_runs_that_never_start_are_still_recorded_with_their_reason(world: World) -> None:
    world.run("no-such-command-xyz")
    world.run("true", flags=["--network", "open"])
    import sqlite3

    conn = sqlite3.connect(world.audit_db)
    rows = conn.execute("SELECT exit_code FROM runs ORDER BY started_at").fetchall()
    detail = conn.execute("SELECT detail FROM events WHERE kind = 'run_end' ORDER BY ts").fetchall()
    conn.close()
    assert [row[0] for row in rows] == [127, 0]
    assert "command not found" in detail[0][0]


@pytest.mark.parametrize("network", ["auto", "open"])
def test_quiet_run_prints_nothing_of_its_own(world: World, network: str) -> None:
    """Nothing but the child's output: no warnings, no tracebacks, whether the broker was needed or not."""
    quick = world.run("true", flags=["-q", "--network", network])
    busy = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("crm", "GET", "/crm/v3/objects/contacts").status)
    """, flags=["-q", "--network", network])
    assert (quick.code, quick.out, quick.err) == (0, "", "")
    assert (busy.code, busy.out, busy.err) == (0, "200\n", "")


def test_a_summary_json_in_a_missing_directory_fails_before_the_loop_runs(world: World) -> None:
    marker = world.work / "ran"
    result = world.run("touch", str(marker), flags=["--summary-json", str(world.work / "missing" / "summary.json")])
    assert result.code == 125 and "--summary-json: cannot write" in result.err, result.err
    assert not marker.exists()
