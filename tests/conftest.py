"""Shared fixtures: a private OUTLOOP_HOME, recording upstreams, canary secrets, and `World.run`.

Tests drive the installed `outloop` command in real subprocesses; nothing of outloop's own is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from operator_support import AuditedWorld

sys.path.insert(0, str(Path(__file__).parent))
from upstream import RecordingUpstream

OUTLOOP = str(Path(sys.executable).parent / "outloop")
PYTHON = sys.executable
# The tests' own file-backed keyring (tests/keyring_backend), chosen through the environment like a user would.
KEYRING_DIR = Path(__file__).parent / "keyring_backend"
KEYRING_BACKEND = "outloop_test_keyring.PlaintextFileKeyring"
sys.path.insert(0, str(KEYRING_DIR))  # test_secrets drives the same backend in-process


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def combined(self) -> str:
        return self.out + self.err


def short_tmpdir(prefix: str) -> Path:
    """Unix socket paths are limited to 107 bytes, so homes live in short /tmp dirs, not pytest's deep ones."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class World:
    """One test's universe: OUTLOOP_HOME, profiles, two upstream hosts and the canary secrets."""

    home: Path  # OUTLOOP_HOME: hidden from the child by the sandbox
    work: Path  # where tests put loop scripts and files the child may read and write
    profiles: Path
    upstream: RecordingUpstream
    other: RecordingUpstream
    canaries: dict[str, str]
    extra_env: dict[str, str] = field(default_factory=dict)
    seen_output: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("OUTLOOP_", "PYTEST_"))}
        env.update({
            "OUTLOOP_HOME": str(self.home),
            "PYTHON_KEYRING_BACKEND": KEYRING_BACKEND,
            "PYTHONPATH": str(KEYRING_DIR),
            "XDG_DATA_HOME": str(self.home / "xdg-data"),
            # Secret-looking variables in outloop's own environment: the child must never see them.
            "AWS_SECRET_ACCESS_KEY": self.canaries["aws"],
            "ACME_CRM_TOKEN": self.canaries["env"],
            "NO_COLOR": "1",
        })
        env.update(self.extra_env)
        return env

    def write_profile(self, name: str, text: str) -> Path:
        path = self.profiles / f"{name}.toml"
        path.write_text(textwrap.dedent(text).replace("{UPSTREAM}", self.upstream.base_url)
                        .replace("{OTHER}", self.other.base_url))
        return path

    def set_keyring(self, workspace: str, credential: str, value: str) -> None:
        self.set_keyrings([(workspace, credential, value)])

    def set_keyrings(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """(workspace, credential, value) entries, stored by one process: each start of Python costs ~0.2 s."""
        code = ("import json, keyring, sys\n"
                "for workspace, credential, value in json.load(sys.stdin):\n"
                "    keyring.set_password('outloop/' + workspace, credential, value)\n")
        subprocess.run([PYTHON, "-c", code], input=json.dumps(list(entries)), text=True, env=self.env, check=True)

    def outloop(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
                stdin: str | None = None) -> Result:
        completed = subprocess.run([OUTLOOP, *args], capture_output=True, text=True, timeout=timeout,
                                   env=env or self.env, input=stdin, cwd=self.work)
        result = Result(completed.returncode, completed.stdout, completed.stderr)
        self.seen_output.append(result.combined)
        return result

    def run(self, *command: str, workspace: str = "acme", flags: Sequence[str] = (),
            env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        return self.outloop("run", "-w", workspace, "--profiles", str(self.profiles), *flags, "--", *command,
                            env=env, timeout=timeout)

    def run_loop(self, source: str, *, workspace: str = "acme", flags: Sequence[str] = (),
                 env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        """Run a Python loop (given as source) under outloop; it can `from outloop_cli.client import Outloop`."""
        script = self.work / f"loop-{uuid.uuid4().hex[:8]}.py"
        script.write_text(textwrap.dedent(source))
        return self.run(PYTHON, str(script), workspace=workspace, flags=flags, env=env, timeout=timeout)

    # ----- audit helpers ---------------------------------------------------------------------------------

    @property
    def audit_db(self) -> Path:
        return self.home / "audit.db"

    def events(self, run_id: str | None = None, kind: str | None = "request") -> list[dict[str, object]]:
        conn = sqlite3.connect(self.audit_db)
        conn.row_factory = sqlite3.Row
        try:
            query, params = "SELECT * FROM events WHERE 1=1", []
            if run_id:
                query += " AND run_id = ?"
                params.append(run_id)
            if kind:
                query += " AND kind = ?"
                params.append(kind)
            return [dict(row) for row in conn.execute(query + " ORDER BY run_id, seq", params)]
        finally:
            conn.close()

    def last_run_id(self) -> str:
        conn = sqlite3.connect(self.audit_db)
        try:
            row = conn.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
            return str(row[0])
        finally:
            conn.close()

    def audit_bytes(self) -> bytes:
        """The DB and its WAL, raw: a canary must not be anywhere in them, not even in free pages."""
        data = b""
        for suffix in ("", "-wal", "-shm"):
            path = Path(str(self.audit_db) + suffix)
            if path.exists():
                data += path.read_bytes()
        return data

    def assert_no_canary(self, *texts: str | bytes) -> None:
        """Every canary is absent from the given texts, outloop's output so far, and the audit DB."""
        haystacks: list[bytes] = [t.encode() if isinstance(t, str) else t for t in texts]
        haystacks += [text.encode() for text in self.seen_output]
        haystacks.append(self.audit_bytes())
        haystacks.append(self.other.all_bytes())
        for name, canary in self.canaries.items():
            for hay in haystacks:
                assert canary.encode() not in hay, f"canary {name} leaked"


ACME_PROFILE = """
    version = 1
    description = "Acme test profile"
    extends = "agency"

    [run]
    env_set = { LOOP_CLIENT = "acme" }

    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    inject = { header = "Authorization", value = "Bearer {secret}" }
    allow = [
        "GET /crm/v3/objects/contacts",
        "GET /crm/v3/objects/contacts/**",
        "POST /crm/v3/objects/contacts",
        "PATCH /crm/v3/objects/contacts/*",
        "GET /sse",
        "GET /redirect",
        "GET /echo-headers",
        "GET /echo-auth-in-header",
        "GET /hang",
        "GET /big",
        "GET /slow-body",
    ]
    deny = ["* /crm/v3/objects/contacts/*/merge"]
"""

GLOBEX_PROFILE = """
    version = 1
    description = "Globex test profile"
    extends = "agency"

    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /crm/v3/objects/contacts/*"]

    [credentials.billing]
    secret = "keyring"
    base_url = "{OTHER}"
    allow = ["GET /**"]
"""

AGENCY_PROFILE = """
    version = 1
    description = "Agency base"

    [credentials.llm]
    secret = "keyring"
    base_url = "{UPSTREAM}/llm"
    inject = { header = "X-Api-Key", value = "{secret}" }
    allow = ["POST /v1/chat/completions", "GET /v1/models"]
"""


@contextlib.contextmanager
def make_world() -> Iterator[World]:
    """A fresh World; the `world` fixture gives one per test, module fixtures share one among read-only tests."""
    base = short_tmpdir("ol-")
    home, work = base / "h", base / "w"
    profiles = home / "profiles"
    profiles.mkdir(parents=True)
    work.mkdir()
    tag = uuid.uuid4().hex
    canaries = {
        "acme": f"cnry-acme-{tag}",
        "globex": f"cnry-globex-{tag}",
        "agency": f"cnry-agency-{tag}",
        "aws": f"cnry-aws-{tag}",
        "env": f"cnry-env-{tag}",
    }
    with RecordingUpstream() as upstream, RecordingUpstream() as other:
        w = World(home=home, work=work, profiles=profiles, upstream=upstream, other=other, canaries=canaries)
        w.write_profile("agency", AGENCY_PROFILE)
        w.write_profile("acme", ACME_PROFILE)
        w.write_profile("globex", GLOBEX_PROFILE)
        w.set_keyrings([("acme", "crm", canaries["acme"]), ("globex", "crm", canaries["globex"]),
                        ("globex", "billing", canaries["globex"] + "-billing"), ("agency", "llm", canaries["agency"])])
        yield w
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def world() -> Iterator[World]:
    with make_world() as w:
        yield w


@pytest.fixture(scope="session")
def audited_world() -> Iterator[AuditedWorld]:
    """One World with an audit.db of real runs, shared by the operator-command tests that only read it."""
    from operator_support import fill_audit

    with make_world() as w:
        yield fill_audit(w)


def parse_json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
