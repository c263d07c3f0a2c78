"""Hostile child, filesystem view: what a prompt-injected loop tried against the host filesystem.

One hostile loop makes every attempt and reports each outcome; it runs under `outloop run` (both backends, root
and unprivileged operators, the workspace view and `filesystem = "host"`), then again without outloop as the
positive control, which must succeed at every attempt the kernel allows that user.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from conftest import World
from sandbox_support import BACKENDS, OPERATORS, Operator, operator, use_backend

HOSTILE = """
    import ctypes, json, os, socket, sys, sysconfig
    spec = json.load(open(sys.argv[1]))
    libc = ctypes.CDLL(None, use_errno=True)
    results = {}
    def attempt(label, action):
        try:
            results[label] = action() or "OK"
        except OSError as exc:
            results[label] = type(exc).__name__ + ":" + (os.strerror(exc.errno) if exc.errno else "")
    def read(path):
        data = open(path, "rb").read()
        return "OK" if b"cnry-" in data else "empty"
    def append(path):
        with open(path, "a") as handle:
            handle.write("\\n# planted by the loop\\n")
    def create(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "x") as handle:
            handle.write("planted")
    def create_and_remove(path):
        create(path)
        os.unlink(path)
    def rewrite(path):  # write back what is there: proves the write, changes nothing
        with open(path) as handle:
            value = handle.read()
        with open(path, "w") as handle:
            handle.write(value)
    def connect(path):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
    def proc_root(path):
        for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if open(f"/proc/{pid}/root{path}", "rb").read(16).startswith(b"SQLite"):
                    return "OK"
            except OSError:
                pass
        raise FileNotFoundError(2, "not through any /proc/<pid>/root")
    def nested_userns():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if libc.unshare(0x10000000 | 0x00020000) == 0 else ctypes.get_errno())
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            raise OSError(code, os.strerror(code))
    for label, path in spec["read"].items():
        attempt(label, lambda: read(path))
    for label, path in spec["append"].items():
        attempt(label, lambda: append(path))
    for label, path in spec["create"].items():
        attempt(label, lambda: create(path))
    for label, path in spec.get("create_and_remove", {}).items():
        attempt(label, lambda: create_and_remove(path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])))
    for label, path in spec.get("rewrite", {}).items():
        attempt(label, lambda: rewrite(path))
    for label, (source, target) in spec["rename"].items():
        attempt(label, lambda: os.rename(source, target))
    for label, path in spec["connect"].items():
        attempt(label, lambda: connect(path))
    attempt("proc_root", lambda: proc_root(spec["audit_db"]))
    attempt("nested_userns", nested_userns)
    print(json.dumps(results))
"""

READS = {"globex_file_secret": None, "ssh_key": ".ssh/id_ed25519", "netrc": ".netrc",
         "gh_hosts": ".config/gh/hosts.yml", "docker_config": ".docker/config.json", "kube_config": ".kube/config",
         "git_credentials": ".git-credentials"}
PERSISTENCE = {"bashrc": ".bashrc", "profile": ".profile", "gitconfig": ".gitconfig"}
# Root-only stores of system secrets (TLS keys, old password hashes, VPN and Kerberos keys).
SYSTEM_SECRETS = ("/etc/ssl/private", "/etc/security/opasswd", "/etc/krb5.keytab", "/etc/wireguard")
ROOT_ONLY = ("core_pattern", "domainname", "irq_affinity", "base_interpreter", "usr_bin")


class HostSocket:
    """A path socket on the host under /tmp, like an ssh-agent's or docker's: counts who gets in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        path.chmod(0o777)
        self.sock.listen(8)
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


def _hostile_host(world: World, op: Operator) -> tuple[dict[str, object], Path]:
    """Plant the operator's credentials, another workspace's key file, repositories and a lookup dir in the cwd."""
    base = world.work.parent
    tag = uuid.uuid4().hex[:8]
    for label, rel in READS.items():
        if rel is not None:
            (op.home / rel).parent.mkdir(parents=True, exist_ok=True)
            (op.home / rel).write_text(f"cnry-{label}-{tag}\n")
    for rel in PERSISTENCE.values():
        (op.home / rel).write_text("# the operator's own\n")
    (op.home / ".config" / "systemd" / "user").mkdir(parents=True)
    keys = base / "globex-keys"
    keys.mkdir()
    (keys / "crm.token").write_text(world.canaries["globex"])
    (keys / "crm.token").chmod(0o600)
    world.write_profile("globex", f"""
        version = 1
        [credentials.crm]
        secret = "file:{keys / 'crm.token'}"
        base_url = "{{UPSTREAM}}"
        allow = ["GET /**"]
    """)
    for repo in (world.work, base):
        (repo / ".git" / "hooks").mkdir(parents=True)
        (repo / ".git" / "config").write_text("[core]\n")
    lookup = world.work / "conf" / "profiles"
    lookup.mkdir(parents=True)
    for profile in world.profiles.glob("*.toml"):
        (lookup / profile.name).write_text(profile.read_text())
    op.give(op.home, keys, world.work, base / ".git")
    spec: dict[str, object] = {
        "read": {label: str(op.home / rel) if rel else str(keys / "crm.token") for label, rel in READS.items()},
        "append": {**{label: str(op.home / rel) for label, rel in PERSISTENCE.items()},
                   "git_config": str(world.work / ".git" / "config"),
                   "parent_git_config": str(base / ".git" / "config")},
        "create": {"systemd_unit": str(op.home / ".config/systemd/user/evil.service"),
                   "git_hook": str(world.work / ".git/hooks/pre-commit"),
                   "parent_git_hook": str(base / ".git/hooks/pre-commit"),
                   "planted_profile": str(lookup / "planted.toml"),
                   "keyring_config": str(_keyring_config(op))},
        "create_and_remove": {"base_interpreter": f"{{stdlib}}/outloop-canary-{tag}.pth",
                              "usr_bin": f"/usr/bin/outloop-canary-{tag}"},
        # Host-wide outside /proc/sys too: IRQ affinity (and PCI config space under /proc/bus, not written here).
        "rewrite": {"core_pattern": "/proc/sys/kernel/core_pattern", "domainname": "/proc/sys/kernel/domainname",
                    "irq_affinity": "/proc/irq/default_smp_affinity"},
        "rename": {"lookup_dir": [str(lookup), str(world.work / "profiles-aside")],
                   "lookup_ancestor": [str(world.work / "conf"), str(world.work / "conf-aside")]},
        "connect": {"host_socket": str(base / "agent.sock")},
        "audit_db": str(world.audit_db),
    }
    return spec, lookup


def _keyring_config(op: Operator) -> Path:
    """keyring's config file, which outloop's own keyring lookup reads (and imports the backend it names)."""
    return Path(op.env.get("XDG_CONFIG_HOME") or op.home / ".config") / "python_keyring" / "keyringrc.cfg"


def _use_host_view(profile: Path) -> None:
    text = profile.read_text()
    if "[run]" in text:
        profile.write_text(text.replace("[run]", "[run]\nfilesystem = \"host\"", 1))
    else:
        profile.write_text(text.replace("version = 1", "version = 1\n[run]\nfilesystem = \"host\"", 1))


@pytest.mark.parametrize("view", ["workspace", "host"])
@pytest.mark.parametrize("who", OPERATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loop_cannot_read_credentials_plant_persistence_or_change_the_next_runs_profiles(
        world: World, backend: str, who: str, view: str) -> None:
    use_backend(world, backend)
    op = operator(world, who)
    spec, lookup = _hostile_host(world, op)
    if view == "host":
        _use_host_view(lookup / "acme.toml")
    sock = HostSocket(world.work.parent / "agent.sock")
    script = world.work / "hostile.py"
    script.write_text(textwrap.dedent(HOSTILE))
    (world.work / "spec.json").write_text(json.dumps(spec))
    op.give(script, world.work / "spec.json")
    before = {p: p.read_bytes() for p in [*lookup.iterdir(), *(op.home / r for r in PERSISTENCE.values())]}

    result = op.outloop_run(op.python, str(script), str(world.work / "spec.json"), profiles=lookup)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # Writes are judged by what reached the host (below): outside its binds the child has a private /tmp, where
    # the worlds of these tests live, so writing "there" succeeds and vanishes. The host view is the whole host:
    # its sockets, and (for a root loop) root's files outside outloop's own installation.
    expected_open = {"host_socket", "usr_bin"} if view == "host" else set()
    judged_inside = set(seen) - set(spec["append"]) - set(spec["create"])  # type: ignore[call-overload]
    assert sorted(label for label in judged_inside - expected_open if seen[label] == "OK") == [], seen
    if view == "workspace":
        assert sock.connections == 0
        assert "filesystem: workspace:" in result.stderr
    else:
        assert "filesystem: HOST" in result.stderr
    assert seen["lookup_ancestor"].startswith("OSError:Device or resource busy"), seen
    assert {p: p.read_bytes() for p in before} == before
    assert not (world.work / "conf-aside").exists() and not (lookup / "planted.toml").exists()
    assert not (op.home / ".config/systemd/user/evil.service").exists()
    assert not _keyring_config(op).exists()
    for name, canary in world.canaries.items():
        assert canary not in result.stdout + result.stderr, name

    control = op.run([op.python, str(script), str(world.work / "spec.json")])
    assert control.returncode == 0, control.stderr
    unguarded = json.loads(control.stdout)
    must_work = set(seen) - (set() if who == "root" else set(ROOT_ONLY))
    assert sorted(label for label in must_work if unguarded[label] != "OK") == [], unguarded


SYSTEM_SECRETS_LOOP = """
    import json, os, sys
    seen = {}
    for path, (dev, ino) in json.load(open(sys.argv[1])).items():
        try:
            st = os.stat(path)
            seen[path] = "host" if (st.st_dev, st.st_ino) == (dev, ino) else "masked"
        except OSError as exc:
            seen[path] = exc.strerror
    print(json.dumps(seen))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_root_loop_does_not_see_the_systems_private_keys_and_password_stores(world: World, backend: str) -> None:
    """Only root may read these, and a root loop keeps uid 0: what it sees of them must be a mask, not the host's
    file (compared by inode, since on a test machine they may be empty)."""
    use_backend(world, backend)
    op = operator(world, "root")
    present = {path: [os.stat(path).st_dev, os.stat(path).st_ino] for path in SYSTEM_SECRETS if os.path.exists(path)}
    assert present, "none of the system secret stores exists on this machine"
    script = world.work / "system_secrets.py"
    script.write_text(textwrap.dedent(SYSTEM_SECRETS_LOOP))
    (world.work / "present.json").write_text(json.dumps(present))
    guarded = op.outloop_run(op.python, str(script), str(world.work / "present.json"))
    assert guarded.returncode == 0, guarded.stderr
    assert json.loads(guarded.stdout) == dict.fromkeys(present, "masked")
    unguarded = op.run([op.python, str(script), str(world.work / "present.json")])
    assert json.loads(unguarded.stdout) == dict.fromkeys(present, "host"), unguarded.stderr
