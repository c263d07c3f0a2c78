"""The sandbox layers, proven by hostile children under a real `outloop run` (and by the same child with the
layer off, so a pass means the layer worked, not that the setup was broken)."""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
import threading
import time

import pytest
from conftest import PYTHON, World
from operator_support import wait_for
from sandbox_support import DNS_QUERY_LOOP, DnsResponder, as_other_user, find_process, give_to, require_layer

pytestmark = pytest.mark.sandbox

BACKENDS = ["bwrap", "unshare"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, world: World) -> str:
    require_layer("bubblewrap" if request.param == "bwrap" else "user_namespaces")
    world.extra_env["OUTLOOP_SANDBOX"] = request.param
    return str(request.param)


class HostServer:
    """A TCP listener on the host's 127.0.0.1 that counts connections: the child must not reach it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


CONNECT_LOOP = """
    import socket, sys
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
        print("connected")
    except OSError as exc:
        print("blocked", type(exc).__name__)
"""


@pytest.mark.parametrize("network", ["auto", "broker-only"])
def test_child_cannot_reach_the_hosts_loopback(world: World, backend: str, network: str) -> None:
    server = HostServer()
    result = world.run_loop(CONNECT_LOOP.replace("int(sys.argv[1])", str(server.port)), flags=["--network", network])
    assert result.out.startswith("blocked"), result.combined
    assert server.connections == 0
    assert f"network: broker-only ({'bubblewrap' if backend == 'bwrap' else 'namespaces'})" in result.err


def test_same_child_connects_when_network_is_open(world: World, backend: str) -> None:
    server = HostServer()
    result = world.run_loop(CONNECT_LOOP.replace("int(sys.argv[1])", str(server.port)), flags=["--network", "open"])
    assert result.out.strip() == "connected", result.combined
    assert "network: open (by profile)" in result.err


def test_child_cannot_query_a_resolver_on_the_host(world: World, backend: str) -> None:
    dns = DnsResponder()
    try:
        blocked = world.run_loop(DNS_QUERY_LOOP.replace("int(sys.argv[1])", str(dns.port)))
        opened = world.run_loop(DNS_QUERY_LOOP.replace("int(sys.argv[1])", str(dns.port)), flags=["--network", "open"])
    finally:
        dns.close()
    assert blocked.out.startswith("blocked"), blocked.combined
    assert opened.out.strip() == "resolved", opened.combined
    assert dns.queries == 1


def test_child_still_reaches_the_broker_when_isolated(world: World, backend: str) -> None:
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("crm", "GET", "/crm/v3/objects/contacts").status)
    """)
    assert result.out.strip() == "200", result.combined
    assert world.upstream.requests[0].header("Authorization") == f"Bearer {world.canaries['acme']}"


READ_LOOP = """
    import json, sys
    results = {}
    for path in sys.argv[1:]:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            results[path] = "empty" if not data else "READ"
        except OSError as exc:
            results[path] = type(exc).__name__
    print(json.dumps(results))
"""


def test_child_cannot_read_outloop_home_keyring_file_secrets_or_hidden_paths(world: World, backend: str) -> None:
    base = world.work.parent  # holds OUTLOOP_HOME and the working dir; the profile lets the child read all of it
    secret_file = base / "secrets" / "crm.token"
    secret_file.parent.mkdir()
    secret_file.write_text(world.canaries["acme"])
    secret_file.chmod(0o600)
    private = base / "private"
    private.mkdir()
    (private / "notes.txt").write_text(world.canaries["globex"])
    world.write_profile("acme", f"""
        version = 1
        [run]
        hide = ["{private}"]
        read = ["{base}"]
        [credentials.crm]
        secret = "file:{secret_file}"
        base_url = "{{UPSTREAM}}"
        allow = ["GET /**"]
    """)
    keyring_file = world.home / "xdg-data" / "python_keyring" / "keyring_pass.cfg"
    assert keyring_file.exists()
    targets = [str(world.audit_db), str(world.profiles / "acme.toml"), str(keyring_file), str(secret_file),
               str(private / "notes.txt")]
    script = world.work / "read.py"
    script.write_text(textwrap.dedent(READ_LOOP))
    world.outloop("run", "-w", "acme", "--profiles", str(world.profiles), "--", "true")  # audit.db exists now
    result = world.run(PYTHON, str(script), *targets)
    seen = json.loads(result.out)
    assert all(state != "READ" for state in seen.values()), seen
    world.assert_no_canary(result.out, result.err)
    assert "filesystem: workspace:" in result.err and "NOT" not in result.err


def test_outside_process_connecting_to_the_socket_gets_401_and_is_audited(world: World) -> None:
    socket_file = world.work / "socket-path"
    release = world.work / "release"
    done = world.work / "done"
    runner = threading.Thread(target=world.run_loop, args=(f"""
        import os, time
        open({str(socket_file)!r}, "w").write(os.environ["OUTLOOP_SOCKET"])
        while not os.path.exists({str(release)!r}):
            time.sleep(0.05)
        open({str(done)!r}, "w").close()
    """,), daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while not socket_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    path = socket_file.read_text()
    probe = subprocess.run([PYTHON, "-c", (
        "import sys; from outloop_cli.client import Outloop; "
        "r = Outloop(sys.argv[1]).request('crm', 'GET', '/crm/v3/objects/contacts'); "
        "print(r.status, r.error['type'])"), path], capture_output=True, text=True, timeout=20)
    release.touch()
    runner.join(timeout=30)
    assert probe.stdout.split() == ["401", "unauthenticated"], probe.stderr
    denied = [e for e in world.events() if e["reason"] == "peer_not_in_run"]
    assert len(denied) == 1 and denied[0]["status"] == 401
    assert world.upstream.requests == []


PROC_PROBE = """
    import ctypes, json, os, sys
    target = int(sys.argv[1])
    results = {"uid": os.getuid()}
    for name in ("environ", "mem", "maps"):
        try:
            with open(f"/proc/{target}/{name}", "rb") as handle:
                handle.read(64)
            results[name] = "READ"
        except OSError as exc:
            results[name] = type(exc).__name__
    libc = ctypes.CDLL(None, use_errno=True)
    PTRACE_ATTACH = 16
    results["ptrace"] = "ATTACHED" if libc.ptrace(PTRACE_ATTACH, target, 0, 0) == 0 else os.strerror(ctypes.get_errno())
    print(json.dumps(results))
"""


def test_a_same_user_process_cannot_read_broker_memory_or_environ(world: World) -> None:
    """The loop cannot even see the broker (own PID namespace); any other process of the operator's user can,
    and PR_SET_DUMPABLE=0 is what keeps it out of the broker's memory and environment."""
    require_layer("dumpable")
    other = as_other_user(world)
    waiter, probe, release = world.work / "wait.py", world.work / "probe.py", world.work / "release"
    started = world.work / "started"
    waiter.write_text(textwrap.dedent(f"""
        import os, time
        open({str(started)!r}, "w").close()
        while not os.path.exists({str(release)!r}):
            time.sleep(0.05)
    """))
    probe.write_text(textwrap.dedent(PROC_PROBE))
    give_to(other.account, waiter, probe)
    command = other.command([str(other.bin_dir / "outloop"), "run", "-w", "acme", "--profiles", str(world.profiles),
                             "--", str(other.bin_dir / "python"), str(waiter)])
    run = subprocess.Popen(command, env=other.env, cwd=world.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        wait_for(started.exists)  # the loop runs: outloop made itself undumpable before it started the loop
        broker = find_process(waiter.name, outloop=True)
        completed = subprocess.run(other.command([str(other.bin_dir / "python"), str(probe), str(broker)]),
                                   capture_output=True, text=True, timeout=60, env=other.env, cwd=world.work)
    finally:
        release.touch()
        out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    seen = json.loads(completed.stdout)
    assert seen["uid"] == other.account.pw_uid != 0
    assert seen["environ"] != "READ" and seen["mem"] != "READ", seen
    assert seen["ptrace"] != "ATTACHED", seen
    assert world.canaries["env"] not in completed.stdout + completed.stderr + out + err


def test_broker_only_fails_closed_when_no_layer_is_available(world: World) -> None:
    env = {**world.env, "OUTLOOP_SANDBOX": "bwrap", "PATH": "/nonexistent"}
    result = world.outloop("run", "-w", "acme", "--profiles", str(world.profiles), "--network", "broker-only",
                           "--", PYTHON, "-c", "print('ran')", env=env)
    assert result.code == 125
    assert "bubblewrap" in result.err
    assert "ran" not in result.out


def test_limits_are_applied_and_reported(world: World, backend: str) -> None:
    require_layer("rlimits")
    world.write_profile("acme", """
        version = 1
        [run]
        cpu_seconds = 1
        processes = 500
        memory = "1G"
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
    """)
    result = world.run_loop("""
        import resource
        print(resource.getrlimit(resource.RLIMIT_CPU)[0], resource.getrlimit(resource.RLIMIT_AS)[0], flush=True)
        while True:
            pass
    """, flags=["--summary-json", str(world.work / "summary.json")])
    assert result.code in (128 + 24, 128 + 9), result.combined  # SIGXCPU, or KILL at the hard limit
    assert result.out.split() == ["1", str(1024**3)]
    summary = json.loads((world.work / "summary.json").read_text())
    assert summary["sandbox"]["limits"] == "memory 1.0GiB, processes 500, cpu 1s"
    assert summary["limit_hit"] == "cpu_seconds"
