"""Another local process or user, outside the run's tree: the broker's sockets, the relay's hand-over socket, and
the base-URL listener on the host's loopback.

The same-user process on $OUTLOOP_SOCKET is covered in tests/test_sandbox.py and token replay in
tests/test_base_url_mode.py (both named in THREATS.md); these add another user, the relay's hand-over (from
outside, and from a loop racing the relay), and a process that knows the token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import World
from sandbox_support import require_layer, unprivileged_user

from adversarial.conftest import BASE_URL_PROFILE, run_hostile

WAITING_LOOP = """
    import json, os, sys, time
    keys = ("OUTLOOP_SOCKET", "OUTLOOP_URL", "OUTLOOP_TOKEN")
    with open(sys.argv[1] + ".tmp", "w") as handle:
        json.dump({key: os.environ.get(key) for key in keys}, handle)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
"""


@contextlib.contextmanager
def running(world: World, flags: tuple[str, ...] = ()) -> Iterator[dict[str, str]]:
    """A run whose child waits; yields what the child can see of the broker (socket path, URL, token)."""
    info, release = world.work / "info.json", world.work / "release"
    runner = threading.Thread(target=run_hostile, args=(world, WAITING_LOOP, str(info), str(release)),
                              kwargs={"flags": flags}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while not info.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield json.loads(info.read_text())
    finally:
        release.touch()
        runner.join(timeout=30)


def _http(sock: socket.socket, request: bytes) -> int:
    sock.settimeout(10)
    sock.sendall(request)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ")[1]) if data else 0


def test_another_user_cannot_open_the_broker_socket(world: World) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second user")
    if not Path("/usr/bin/python3").exists():
        message = "/usr/bin/python3 is missing: the second user needs a world-readable Python"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    user = unprivileged_user()
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1]); print('CONNECTED')\n"
             "except OSError as exc:\n    print(type(exc).__name__)\n")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    with running(world) as info:
        socket_path = Path(info["OUTLOOP_SOCKET"])
        for directory in (world.home.parent, world.home, world.home / "run"):
            directory.chmod(0o755)  # only the run dir (0700) and the socket (0600) stand in the way
        outcomes = []
        for lax in (False, True):
            if lax:
                socket_path.parent.chmod(0o755)  # even a run dir opened up: the socket itself is 0600
            outcomes.append(subprocess.run(
                [runuser, "-u", user.pw_name, "--", "/usr/bin/python3", "-c", probe, str(socket_path)],
                capture_output=True, text=True, timeout=20).stdout.strip())
    assert outcomes == ["PermissionError", "PermissionError"]
    assert world.events() == []  # nothing reached the broker at all


def test_outside_process_finds_no_hand_over_socket_to_use_even_with_the_token(world: World) -> None:
    """The relay hands its listener to the broker on loopback.sock, which then goes away: nothing on the host
    leads to the run's base-URL listener."""
    require_layer("network_isolation")
    world.write_profile("acme", BASE_URL_PROFILE)
    with running(world) as info:
        hand_over = Path(info["OUTLOOP_SOCKET"]).with_name("loopback.sock")
        deadline = time.monotonic() + 30
        while hand_over.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as sock, pytest.raises(FileNotFoundError):
            sock.connect(str(hand_over))
    # The listener itself was made inside the child's network namespace, which no host process can enter
    # without privileges over it; a host port of the same number is somebody else's, if anybody's.
    assert world.events() == []
    assert world.upstream.requests == []
    (start,) = world.events(world.last_run_id(), kind="run_start")
    assert "broker-only" in str(start["detail"])  # isolated: the hand-over only exists then


PLANTING_LOOP = """
    import array, json, os, socket, sys, urllib.request
    run_dir = os.path.dirname(os.environ["OUTLOOP_SOCKET"])
    mine = socket.create_server(("127.0.0.1", 0))  # the listener the loop would like the broker to serve
    planted = {}
    for name in ("loopback.sock", "proxy.sock"):
        try:
            with socket.socket(socket.AF_UNIX) as channel:
                channel.connect(os.path.join(run_dir, name))
                channel.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mine.fileno()]))])
            planted[name] = "sent"
        except OSError as exc:
            planted[name] = type(exc).__name__
    request = urllib.request.Request(os.environ["CRM_URL"] + "/contacts", headers={"X-Key": os.environ["CRM_TOKEN"]})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as answer:
        status = answer.status
    mine.settimeout(0.5)
    try:
        mine.accept()
        served = "broker connected to the loop's listener"
    except TimeoutError:
        served = "nothing"
    print(json.dumps({"planted": planted, "status": status, "served": served}))
"""


def test_a_loop_racing_the_relay_cannot_plant_its_own_listener(world: World) -> None:
    """The hand-over sockets are in the run dir, which the loop can reach; the relay connected to them before the
    loop existed, and the broker takes only that first connection."""
    require_layer("network_isolation")
    world.write_profile("acme", BASE_URL_PROFILE)
    result = run_hostile(world, PLANTING_LOOP)
    assert result.code == 0, result.err
    report = json.loads(result.out.strip().splitlines()[-1])
    assert report["status"] == 200 and report["served"] == "nothing"  # the relay's listener is the one served
    # Usually "sent": the loop connects while the broker stack still loads, behind the relay's connection.
    assert set(report["planted"]) == {"loopback.sock", "proxy.sock"}
    assert "was not served" not in result.err
    (request,) = world.upstream.requests
    assert request.header("Authorization") == f"Bearer {world.canaries['acme']}"


def test_loopback_listener_answers_only_this_runs_token(world: World) -> None:
    world.write_profile("acme", BASE_URL_PROFILE)
    with running(world, flags=("--network", "open")) as info:
        host, port = info["OUTLOOP_URL"].removeprefix("http://").split(":")
        statuses = []
        for header in ("", "Authorization: Bearer outloop-guess\r\n", "X-Api-Key: " + info["OUTLOOP_TOKEN"][:-1]
                       + "\r\n", "Authorization: Bearer " + info["OUTLOOP_TOKEN"] + "\r\n"):
            with socket.create_connection((host, int(port))) as sock:
                statuses.append(_http(sock, f"GET /v1/http/crm/x HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode()))
    # Without a network namespace the token is the only boundary: whoever holds it may use the run's broker.
    assert statuses == [401, 401, 401, 200]
    assert [e["reason"] for e in world.events()] == ["bad_token"] * 3 + ["allowed"]
    (request,) = world.upstream.requests
    assert request.header("Authorization") == f"Bearer {world.canaries['acme']}"  # the token never goes upstream
