"""Hostile child, filesystem: outloop's state, the keyring, `file:` secrets, the profiles that govern the next
run, outloop's own code, and sockets that lead to a keyring.

Reading OUTLOOP_HOME, the keyring file, `file:` secrets and `hide` paths is covered in tests/test_sandbox.py
(named in THREATS.md); this adds writing, replacing, reaching them through the broker's /proc entries, and
changing what the next run will load.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest
from conftest import World
from sandbox_support import require_layer

import outloop_cli
from adversarial.conftest import json_lines, run_hostile

ATTEMPT_LOOP = """
    import errno, json, os, sys
    plan = json.load(open(sys.argv[1]))
    def outloop_pid():
        pid = os.getppid()
        while pid > 1:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
            if len(argv) > 1 and argv[1].endswith(b"/outloop"):
                return pid
            stat = open(f"/proc/{pid}/stat", "rb").read()
            pid = int(stat[stat.rfind(b")") + 2:].split()[1])
    broker = outloop_pid()
    def attempt(action, path):
        try:
            if action == "read":
                with open(path, "rb") as handle:
                    return "READ" if handle.read() else "empty"
            if action == "write":
                with open(path, "ab") as handle:
                    handle.write(b"planted by the child\\n")
                return "WROTE"
            if action == "unlink":
                os.unlink(path)
                return "UNLINKED"
            if action == "list":
                return "LISTED " + str(len(os.listdir(path)))
        except OSError as exc:
            return errno.errorcode.get(exc.errno, type(exc).__name__)
    results = {}
    for action, path in plan:
        path = path.replace("{broker}", str(broker))
        results[f"{action} {path.replace(str(broker), '{broker}')}"] = attempt(action, path)
    for fd in ("0", "3", "4", "5", "6", "7", "8", "9", "10"):
        results[f"read /proc/{{broker}}/fd/{fd}"] = attempt("read", f"/proc/{broker}/fd/{fd}")
    print(json.dumps(results))
"""


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("backend", ["bwrap", "unshare"])
def test_child_cannot_touch_outloop_state_the_next_runs_profile_or_outloop_code(world: World, backend: str) -> None:
    require_layer("bubblewrap" if backend == "bwrap" else "user_namespaces")
    world.extra_env["OUTLOOP_SANDBOX"] = backend
    # Profiles outside OUTLOOP_HOME (--profiles DIR), so they are not hidden: the child may read, not change them.
    # The profile lets the child read everything around its working dir, so the masks, not the view, must hold.
    base = world.home.parent
    profiles = base / "profiles"
    profiles.mkdir()
    secret_file = base / "secrets" / "crm.token"
    secret_file.parent.mkdir()
    secret_file.write_text(world.canaries["acme"])
    secret_file.chmod(0o600)
    note = base / "secrets" / "private" / "note.txt"
    note.parent.mkdir()
    note.write_text(world.canaries["globex"])
    (profiles / "acme.toml").write_text(f"""
version = 1
extends = "agency"
[run]
hide = ["{note.parent}"]
read = ["{base}"]
[credentials.crm]
secret = "file:{secret_file}"
base_url = "{world.upstream.base_url}"
allow = ["GET /crm/**"]
""")
    (profiles / "agency.toml").write_text((world.profiles / "agency.toml").read_text())
    before = _digest(profiles)
    keyring = world.home / "xdg-data" / "python_keyring" / "keyring_pass.cfg"
    package = Path(outloop_cli.__file__).parent
    site_pth = Path(sys.prefix) / f"zz-outloop-attack-{uuid.uuid4().hex[:8]}.pth"
    planted = package / f"zz_attack_{uuid.uuid4().hex[:8]}.py"
    plan = [
        ("read", str(world.audit_db)), ("read", str(keyring)), ("read", str(secret_file)), ("read", str(note)),
        ("write", str(world.audit_db)), ("unlink", str(world.audit_db)), ("write", str(world.home / "planted")),
        ("write", str(profiles / "acme.toml")), ("write", str(profiles / "globex.toml")),
        ("unlink", str(profiles / "agency.toml")), ("write", str(planted)), ("write", str(site_pth)),
        ("list", "/proc/{broker}/fd"), ("read", "/proc/{broker}/environ"), ("read", "/proc/{broker}/mem"),
        ("list", "/proc/{broker}/root" + str(world.home)), ("list", "/proc/{broker}/cwd"),
    ]
    (world.work / "plan.json").write_text(json.dumps(plan))
    try:
        first = run_hostile(world, ATTEMPT_LOOP, str(world.work / "plan.json"),
                            flags=["--profiles", str(profiles)])
        assert first.code == 0, first.err
        seen = json_lines(first.out)[0]
    finally:
        for leftover in (planted, site_pth):
            leftover.unlink(missing_ok=True)
    wrong = {k: v for k, v in seen.items() if v in ("READ", "WROTE", "UNLINKED") or str(v).startswith("LISTED")}
    # Writes into hidden dirs land in the sandbox's empty tmpfs and vanish. The broker is outside the child's PID
    # namespace (its /proc entries do not exist there). Nothing else may succeed.
    assert set(wrong) <= {f"write {world.audit_db}", f"unlink {world.audit_db}", f"write {world.home / 'planted'}",
                          "list /proc/{broker}/fd"}, seen
    for path in (profiles / "acme.toml", profiles / "globex.toml", profiles / "agency.toml", planted, site_pth):
        assert seen[f"{'unlink' if path.name == 'agency.toml' else 'write'} {path}"] == "EROFS", seen
    assert _digest(profiles) == before
    assert not (world.home / "planted").exists() and not planted.exists() and not site_pth.exists()
    # The next run loads the same rules, and the audit DB the child "wrote" is intact (the collector verifies it).
    second = world.outloop("run", "-w", "acme", "--profiles", str(profiles), "--", "true")
    assert second.code == 0, second.err
    assert len(world.events(kind="run_start")) == 2


ABSTRACT_LOOP = """
    import socket, sys
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2)
    try:
        sock.connect("\\0" + sys.argv[1])
        print("connected")
    except OSError as exc:
        print("blocked", type(exc).__name__)
"""


def test_child_cannot_reach_an_abstract_socket_such_as_a_session_bus(world: World) -> None:
    """A desktop keyring answers on the D-Bus session bus, often an abstract Unix socket: those belong to the
    network namespace, so an isolated child cannot reach one, while `network = "open"` can (the control)."""
    require_layer("network_isolation")
    name = f"outloop-test-bus-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX)
    server.bind("\0" + name)
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        isolated = run_hostile(world, ABSTRACT_LOOP, name)
        opened = run_hostile(world, ABSTRACT_LOOP, name, flags=["--network", "open"])
    finally:
        server.close()
    assert isolated.out.startswith("blocked"), isolated.combined
    assert opened.out.strip() == "connected", opened.combined
    assert len(accepted) == 1
