"""Hostile child, processes: what a prompt-injected loop tried against other processes, the terminal, the fds it
was handed, System V IPC, and the end of the run.

Each attack runs under `outloop run` (both backends, root and unprivileged operators) and again without outloop
as the positive control, which must succeed where the kernel lets that user do it at all.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import pty
import select
import subprocess
import termios
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import World
from operator_support import wait_for
from sandbox_support import BACKENDS, OPERATORS, Operator, find_process, operator, use_backend

VICTIM = """
    import os, socket, sys, time
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(os.environ["OUTLOOP_SOCKET"])
    with open(sys.argv[1] + ".tmp", "w") as handle:
        handle.write(str(sock.fileno()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
"""

ATTACKER = """
    import ctypes, json, os, signal, sys, time
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    spec = json.load(open(sys.argv[1]))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    PIDFD_OPEN, PIDFD_GETFD = 434, 438
    def fail():
        return os.strerror(ctypes.get_errno())
    results = {}
    for name, pid in spec["targets"].items():
        results[name + "_visible"] = "OK" if os.path.exists(f"/proc/{pid}") else "absent"
        try:
            os.kill(pid, 0)
            results[name + "_signal"] = "OK"
        except OSError as exc:
            results[name + "_signal"] = exc.strerror
        pidfd = libc.syscall(PIDFD_OPEN, pid, 0)
        results[name + "_pidfd"] = "OK" if pidfd >= 0 else fail()
        if name == "victim_loop" and pidfd >= 0:
            stolen = libc.syscall(PIDFD_GETFD, pidfd, spec["victim_fd"], 0)
            if stolen < 0:
                results["steal"] = fail()
            else:
                os.write(stolen, b"GET /v1/http/crm/crm/v3/objects/contacts/1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                results["steal"] = "OK " + os.read(stolen, 64).decode(errors="replace").split("\\r\\n")[0]
    seen = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                seen.append(open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace"))
            except OSError:
                pass
    results["foreign_processes"] = sorted(c for c in seen if spec["victim_marker"] in c or "/outloop\\0run" in c)
    print(json.dumps(results))
"""


@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loop_cannot_see_signal_or_steal_from_outloop_its_parents_or_another_run(
        world: World, backend: str, who: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    world.write_profile("globex", """
        version = 1
        [credentials.crm]
        secret = "env:ACME_CRM_TOKEN"
        base_url = "{UPSTREAM}"
        allow = ["GET /**"]
    """)
    tag = uuid.uuid4().hex[:8]
    victim_script, attacker_script = world.work / f"victim-{tag}.py", world.work / f"attacker-{tag}.py"
    victim_script.write_text(textwrap.dedent(VICTIM))
    attacker_script.write_text(textwrap.dedent(ATTACKER))
    fd_file, release, spec_file = world.work / "victim-fd", world.work / "release", world.work / "spec.json"
    op.give(victim_script, attacker_script)
    command = [op.outloop, "run", "-w", "globex", "--profiles", str(world.profiles), "--", op.python,
               str(victim_script), str(fd_file), str(release)]
    victim = subprocess.Popen(op.command(command), env=op.env, cwd=world.work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(fd_file.exists)
        targets = {"victim_loop": find_process(victim_script.name), "launcher": os.getpid(),
                   "victim_outloop": find_process(victim_script.name, outloop=True)}
        attacker = subprocess.Popen(op.command([op.outloop, "run", "-w", "acme", "--profiles", str(world.profiles),
                                                "--", op.python, str(attacker_script), str(spec_file)]),
                                    env=op.env, cwd=world.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        targets["outloop"] = find_process(attacker_script.name, outloop=True)
        spec = {"targets": targets, "victim_fd": int(fd_file.read_text()), "victim_marker": victim_script.name}
        spec_file.write_text(json.dumps(spec))
        out, err = attacker.communicate(timeout=60)
        assert attacker.returncode == 0, err
        seen = json.loads(out)
        assert seen["foreign_processes"] == [], seen
        assert {k: v for k, v in seen.items() if v == "OK" or str(v).startswith("OK ")} == {}, seen
        assert "steal" not in seen and world.upstream.requests == []

        spec_file.unlink()
        control = subprocess.Popen(op.command([op.python, str(attacker_script), str(spec_file)]), env=op.env,
                                   cwd=world.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        spec_file.write_text(json.dumps(spec))
        out, err = control.communicate(timeout=60)
        unguarded = json.loads(out)
        assert unguarded["foreign_processes"] != []
        mine = ["victim_loop", "victim_outloop"] + (["launcher"] if who == "root" else [])
        assert all(unguarded[f"{name}_visible"] == unguarded[f"{name}_signal"] == "OK" for name in mine), unguarded
        if who == "root":  # root's pidfd_getfd takes any process's connection; the broker cannot tell
            assert unguarded["steal"] == "OK HTTP/1.1 200 OK", unguarded
            assert len(world.upstream.requests) == 1
    finally:
        release.touch()
        victim.communicate(timeout=60)


TIOCSTI_LOOP = """
    import fcntl, signal, sys, termios, time
    signal.signal(signal.SIGINT, lambda *_: sys.exit(7))
    try:
        fcntl.ioctl(0, termios.TIOCSTI, b"#")
        print("injected", flush=True)
    except OSError as exc:
        print("refused", exc.strerror, flush=True)
    print("waiting", flush=True)
    time.sleep(60)
"""


def _in_a_terminal(op: Operator, argv: list[str]) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start `argv` as the session leader of a new pty, as a shell would start it in the operator's terminal."""
    master, slave = pty.openpty()
    if op.other is not None:
        os.chown(os.ttyname(slave), op.other.account.pw_uid, -1)

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(op.command(argv), stdin=slave, stdout=slave, stderr=slave, env=op.env,
                               cwd=op.world.work, preexec_fn=take_terminal)
    return process, master, slave


def _read_until(master: int, marker: bytes, timeout: float = 30.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data += os.read(master, 4096)
            except OSError:
                break
    return data


def _pending_input(slave: int) -> bytes:
    """What is waiting in the terminal's input queue: where TIOCSTI puts the operator's next command."""
    attributes = termios.tcgetattr(slave)
    attributes[3] &= ~termios.ICANON
    attributes[6][termios.VMIN], attributes[6][termios.VTIME] = 0, 0
    termios.tcsetattr(slave, termios.TCSANOW, attributes)
    try:
        return os.read(slave, 64)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiocsti_cannot_push_input_into_the_operators_terminal_and_ctrl_c_still_stops_the_run(
        world: World, backend: str, who: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    script = world.work / "tiocsti.py"
    script.write_text(textwrap.dedent(TIOCSTI_LOOP))
    op.give(script)
    process, master, slave = _in_a_terminal(op, [op.outloop, "run", "-w", "acme", "--profiles", str(world.profiles),
                                                 "--", op.python, str(script)])
    output = _read_until(master, b"waiting")
    pending = _pending_input(slave)  # before Ctrl-C, which flushes the input queue
    os.write(master, b"\x03")  # Ctrl-C: the terminal signals outloop's group; outloop forwards it to the loop
    assert process.wait(timeout=30) == 7
    assert b"refused" in output and b"injected" not in output, output
    assert b"#" not in pending

    control, master2, slave2 = _in_a_terminal(op, [op.python, str(script)])
    unguarded = _read_until(master2, b"waiting")
    pending = _pending_input(slave2)
    os.write(master2, b"\x03")
    control.wait(timeout=30)
    if Path("/proc/sys/dev/tty/legacy_tiocsti").read_text().strip() != "0":  # else the kernel refuses it to all
        assert b"injected" in unguarded, unguarded
        assert b"#" in pending
    for fd in (master, slave, master2, slave2):
        os.close(fd)


FD_LOOP = """
    import os
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.lseek(fd, 0, 0)
                if b"cnry-" in os.read(fd, 4096):
                    found.append(fd)
            except OSError:
                pass
    print("found" if found else "nothing")
"""


@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_fd_inherited_by_outloop_does_not_reach_the_loop(world: World, backend: str, who: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    script = world.work / "fds.py"
    script.write_text(textwrap.dedent(FD_LOOP))
    secret = world.work.parent / "held-open"  # outside the loop's view: only the fd could carry it
    secret.write_text(world.canaries["globex"])
    op.give(script, secret)
    fd = os.open(secret, os.O_RDONLY)
    try:
        argv = [op.outloop, "run", "-w", "acme", "--profiles", str(world.profiles), "--", op.python, str(script)]
        guarded = subprocess.run(op.command(argv), env=op.env, cwd=world.work, capture_output=True, text=True,
                                 pass_fds=(fd,), timeout=60)
        unguarded = subprocess.run(op.command([op.python, str(script)]), env=op.env, cwd=world.work,
                                   capture_output=True, text=True, pass_fds=(fd,), timeout=60)
    finally:
        os.close(fd)
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.strip() == "nothing"
    assert unguarded.stdout.strip() == "found", unguarded.stderr


# The operator's login (pam_keyinit) gives its session a keyring; tokens put there with `keyctl padd ... @s`
# are a real store. This stands in for that login: a named session keyring holding a key, then exec.
KEYRING_LOGIN = """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    KEYCTL, ADD_KEY, JOIN_SESSION_KEYRING, SESSION = {"x86_64": (250, 248), "aarch64": (219, 217)}[
        os.uname().machine] + (1, -3)
    assert libc.syscall(KEYCTL, JOIN_SESSION_KEYRING, b"operator-login") > 0, ctypes.get_errno()
    value = sys.argv[1].encode()
    assert libc.syscall(ADD_KEY, b"user", b"outloop-test-token", value, len(value), SESSION) > 0
    os.execv(sys.argv[2], sys.argv[2:])
"""

KEYRING_LOOP = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    KEYCTL = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    SEARCH, READ, SESSION, USER = 10, 11, -3, -4
    found = []
    for ring in (SESSION, USER):
        key = libc.syscall(KEYCTL, SEARCH, ring, b"user", b"outloop-test-token", 0)
        buffer = ctypes.create_string_buffer(256)
        if key > 0 and libc.syscall(KEYCTL, READ, key, buffer, 256) > 0 and b"cnry-" in buffer.value:
            found.append(ring)
    print("found" if found else "nothing")
"""


@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loop_cannot_read_the_operators_session_keyring(world: World, backend: str, who: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    login, script = world.work / "login.py", world.work / "keys.py"
    login.write_text(textwrap.dedent(KEYRING_LOGIN))
    script.write_text(textwrap.dedent(KEYRING_LOOP))
    op.give(login, script)
    token = world.canaries["globex"]
    outloop = [op.outloop, "run", "-w", "acme", "--profiles", str(world.profiles), "--", op.python, str(script)]
    guarded = op.run([op.python, str(login), token, *outloop])
    unguarded = op.run([op.python, str(login), token, op.python, str(script)])
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.strip() == "nothing"
    assert unguarded.stdout.strip() == "found", unguarded.stderr


IPC_LOOP = """
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    IPC_CREAT = 0o1000
    theirs = libc.shmget(int(sys.argv[1]), 0, 0)
    mine = libc.shmget(int(sys.argv[2]), 4096, IPC_CREAT | 0o666)
    print(json.dumps({"operators_segment": "OK" if theirs >= 0 else os.strerror(ctypes.get_errno()),
                      "left_behind": "OK" if mine >= 0 else os.strerror(ctypes.get_errno())}))
"""


def _host_segment(key: int) -> int | None:
    for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[0]) == key:
            return int(fields[1])
    return None


@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loop_cannot_reach_the_operators_sysv_ipc_or_leave_its_own(world: World, backend: str, who: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    script = world.work / "ipc.py"
    script.write_text(textwrap.dedent(IPC_LOOP))
    op.give(script)
    libc = ctypes.CDLL(None, use_errno=True)
    theirs, mine = 0x6F6C0000 + os.getpid() % 0xFFFF, 0x6F6D0000 + os.getpid() % 0xFFFF
    owner = op.other.account.pw_uid if op.other is not None else os.getuid()
    segment = libc.shmget(theirs, 4096, 0o1000 | 0o600)
    assert segment >= 0
    try:
        _give_segment(libc, segment, owner)
        guarded = op.outloop_run(op.python, str(script), str(theirs), str(mine))
        assert guarded.returncode == 0, guarded.stderr
        assert json.loads(guarded.stdout) == {"operators_segment": "No such file or directory", "left_behind": "OK"}
        assert _host_segment(mine) is None
        unguarded = op.run([op.python, str(script), str(theirs), str(mine)])
        assert json.loads(unguarded.stdout) == {"operators_segment": "OK", "left_behind": "OK"}
        assert _host_segment(mine) is not None
    finally:
        for key in (theirs, mine):
            shmid = _host_segment(key)
            if shmid is not None:
                libc.shmctl(shmid, 0, None)  # IPC_RMID


def _give_segment(libc: ctypes.CDLL, shmid: int, uid: int) -> None:
    """shmctl(IPC_SET) to make the operator the segment's owner (the test may run as root for a user)."""
    buffer = ctypes.create_string_buffer(256)
    assert libc.shmctl(shmid, 2, buffer) == 0  # IPC_STAT
    ctypes.c_uint32.from_buffer(buffer, 4).value = uid  # struct ipc_perm: key, uid, gid, ...
    assert libc.shmctl(shmid, 1, buffer) == 0  # IPC_SET
