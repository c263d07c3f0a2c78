"""Hostile child, environment and /proc: looking for a secret in its own environment, in the broker's, and in
every process it can see, including the shell that started outloop (cron's `sh -c`), which holds the
operator's environment with `env:` secrets in it.

The child has a PID namespace of its own: outloop, the shell and every other process outside the run do not
exist for it. Behind that, the broker is not dumpable either (tests/test_sandbox.py reads it from outside).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import OUTLOOP, PYTHON, World
from sandbox_support import OtherUser, as_other_user, require_layer

from adversarial.conftest import RAWHTTP

SCAN_LOOP = """
    import json, os
    def read(path):
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            return type(exc).__name__
    found, ancestors = [], []
    own = json.dumps(dict(os.environ)).encode() + read("/proc/self/environ") + read("/proc/self/cmdline")
    if b"cnry-" in own:
        found.append("own environment")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for name in ("environ", "cmdline"):
            data = read(f"/proc/{pid}/{name}")
            if isinstance(data, bytes) and b"cnry-" in data:
                found.append(f"/proc/{pid}/{name}")
    pid = os.getppid()
    while pid > 1:
        cmdline = read(f"/proc/{pid}/cmdline")
        environ = read(f"/proc/{pid}/environ")
        ancestors.append({"cmdline": cmdline.decode("latin-1") if isinstance(cmdline, bytes) else cmdline,
                          "environ": "READ" if isinstance(environ, bytes) else environ})
        stat = read(f"/proc/{pid}/stat")
        pid = int(stat[stat.rfind(b")") + 2:].split()[1]) if isinstance(stat, bytes) else 1
    print(json.dumps({"uid": os.getuid(), "found": found, "ancestors": ancestors}))
"""
CRON_MARKER = "cron-like-parent"


def _scan(world: World, outloop: str, python: str, env: dict[str, str], other: OtherUser | None = None
          ) -> dict[str, object]:
    """Start outloop the way cron does, from a shell that stays alive holding the operator's environment."""
    script = world.work / "scan.py"
    script.write_text(SCAN_LOOP.replace("\n    ", "\n").strip() + "\n")
    shutil.copy(RAWHTTP, world.work / "rawhttp.py")
    command = ["/bin/sh", "-c", f'"$@"; status=$?; : {CRON_MARKER}; exit $status', "sh", outloop, "run", "-w",
               "acme", "--profiles", str(world.profiles), "--", python, str(script)]
    if other is not None:
        command = other.command(command)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=world.work)
    world.seen_output.append(completed.stdout + completed.stderr)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    assert isinstance(report, dict)
    return report


def _assert_nothing_found(report: dict[str, object]) -> None:
    assert report["found"] == []
    ancestors = report["ancestors"]
    assert isinstance(ancestors, list)
    argvs = [ancestor["cmdline"].split("\x00") for ancestor in ancestors]
    outloop = [a for a, argv in zip(ancestors, argvs, strict=True) if argv[1:2] and argv[1].endswith("/outloop")]
    cron = [a for a, argv in zip(ancestors, argvs, strict=True) if argv[0] == "/bin/sh" and CRON_MARKER in argv[2]]
    # Neither process exists in the child's PID namespace: its ancestry ends at the namespace's init.
    assert outloop == [] and cron == [], ancestors
    assert all("cnry-" not in ancestor["cmdline"] for ancestor in ancestors)


@pytest.mark.parametrize("backend", ["bwrap", "unshare"])
def test_child_finds_no_secret_in_any_environment_it_can_see(world: World, backend: str) -> None:
    require_layer("bubblewrap" if backend == "bwrap" else "user_namespaces")
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "env:ACME_CRM_TOKEN"
        base_url = "{UPSTREAM}"
        allow = ["GET /**"]
    """)
    report = _scan(world, OUTLOOP, PYTHON, {**world.env, "OUTLOOP_SANDBOX": backend})
    _assert_nothing_found(report)


def test_non_root_child_finds_no_secret_in_any_environment_it_can_see(world: World) -> None:
    require_layer("process_isolation")
    other = as_other_user(world)
    report = _scan(world, str(other.bin_dir / "outloop"), str(other.bin_dir / "python"), other.env, other)
    assert report["uid"] == other.account.pw_uid
    _assert_nothing_found(report)
