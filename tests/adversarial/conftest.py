"""Fixtures for the hostile suite: every World it makes is harvested by one session-wide canary collector.

At the end of the session the collector asserts two things over everything the suite produced:
- no canary (raw or base64) appears in any outloop output (child output and summaries), any byte the child
  received from the broker (`wire.log`), any file the child or outloop wrote in the work dir, any audit DB,
  any request to a host that is not the credential's, or any request to the credential's host outside the
  header or query parameter the secret is injected into;
- `outloop audit verify` passes over the suite's audit DB: every test's audit.db, copied at teardown (each
  test has its own OUTLOOP_HOME) and merged into one file, so one real verify checks every run the suite made.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import OUTLOOP, PYTHON, Result, World, make_world

RAWHTTP = Path(__file__).with_name("rawhttp.py")
CANARY_PREFIX = "cnry-"
# Where the suite's profiles inject secrets; the credential's own host may see a canary there and nowhere else.
INJECTION_HEADERS = frozenset({"authorization", "x-api-key"})
INJECTION_PARAMS = frozenset({"hapikey", "key"})
SECRETS_DIR = "secrets"  # under world.work: files a test fills with a canary on purpose (file: sources)
# Base-URL mode: the loop reaches the credential at CRM_URL with the run's placeholder token, as an SDK would.
BASE_URL_PROFILE = """
    version = 1
    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /**"]
    child_env = { CRM_URL = "{url}", CRM_TOKEN = "{token}" }
"""


def _injection_stripped(raw: bytes) -> bytes:
    """A recorded upstream request minus the injected header lines and query parameters."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.rpartition(b" ")
    path, _, query = target.partition(b"?")
    kept = [pair for pair in query.split(b"&")
            if pair and pair.split(b"=", 1)[0].decode("latin-1").lower() not in INJECTION_PARAMS]
    first = method + b" " + path + (b"?" + b"&".join(kept) if kept else b"") + b" " + version
    headers = [line for line in lines[1:]
               if line.split(b":", 1)[0].strip().decode("latin-1").lower() not in INJECTION_HEADERS]
    return b"\r\n".join([first, *headers]) + sep + body


class CanaryCollector:
    """Gathers haystacks from every World of the session; `finish` checks them all at once."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.canaries: dict[bytes, str] = {}  # every form searched for -> "test: name"
        self.haystacks: list[tuple[str, bytes]] = []
        self.audit_copies: list[Path] = []
        self.verified_runs = 0

    def add_canary(self, value: str, label: str) -> None:
        assert value.startswith(CANARY_PREFIX), "canaries start with cnry- so the scan can find them fast"
        import base64

        self.canaries[value.encode()] = label
        self.canaries[base64.b64encode(value.encode())] = label + " (base64)"

    def add(self, label: str, data: bytes) -> None:
        if data:
            self.haystacks.append((label, data))

    def harvest(self, world: World, test: str) -> None:
        for name, value in world.canaries.items():
            self.add_canary(value, f"{test}: canary {name}")
        for index, text in enumerate(world.seen_output):
            self.add(f"{test}: outloop output #{index}", text.encode())
        for path in sorted(world.work.rglob("*")):
            if path.is_file() and SECRETS_DIR not in path.relative_to(world.work).parts:
                self.add(f"{test}: file {path.relative_to(world.work)}", path.read_bytes())
        self.add(f"{test}: audit.db", world.audit_bytes())
        self.add(f"{test}: requests to the other host", world.other.all_bytes())
        for index, request in enumerate(world.upstream.requests):
            self.add(f"{test}: upstream request #{index} outside the injection", _injection_stripped(request.raw))
            self.add(f"{test}: upstream request #{index} body", request.body)
        if world.audit_db.exists():
            copy = self.base / f"{len(self.audit_copies):04d}.db"
            source, target = sqlite3.connect(world.audit_db), sqlite3.connect(copy)
            try:
                source.backup(target)  # a consistent snapshot, WAL included
            finally:
                source.close()
                target.close()
            self.audit_copies.append(copy)

    def leaks(self) -> list[str]:
        """Every (canary, haystack) hit; searched by the forms' short prefixes, so gigabytes stay cheap."""
        prefixes = {form[:6] for form in self.canaries}
        found = []
        for label, data in self.haystacks:
            for prefix in prefixes:
                at = data.find(prefix)
                while at != -1:
                    for form, name in self.canaries.items():
                        if data.startswith(form, at):
                            found.append(f"{name} found in {label}")
                    at = data.find(prefix, at + 1)
        return found

    def merged_audit(self) -> tuple[Path, int]:
        """One audit.db holding every run of the suite (run ids are unique), and how many runs that is."""
        home = self.base / "suite"
        home.mkdir(mode=0o700)
        merged = home / "audit.db"
        runs = 0
        for index, copy in enumerate(self.audit_copies):
            if index == 0:
                shutil.copyfile(copy, merged)
                conn = sqlite3.connect(merged)
            else:
                conn.execute("ATTACH DATABASE ? AS other", (str(copy),))
                for table in ("runs", "events", "pruned"):
                    conn.execute(f"INSERT INTO main.{table} SELECT * FROM other.{table}")
                conn.commit()
                conn.execute("DETACH DATABASE other")
            runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        if self.audit_copies:
            conn.close()
        return home, runs

    def finish(self) -> list[str]:
        """Problems found across the session, empty when the suite held."""
        problems = self.leaks()
        if not self.audit_copies:
            return problems
        home, runs = self.merged_audit()
        completed = subprocess.run([OUTLOOP, "audit", "verify", "--json"], capture_output=True, text=True,
                                   env={"OUTLOOP_HOME": str(home), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
                                   timeout=120)
        try:
            report = json.loads(completed.stdout)
        except ValueError:
            return [*problems, f"outloop audit verify printed no JSON: {completed.stderr[-2000:]}"]
        if completed.returncode != 0 or report["broken"] or report["incomplete"] or report["runs"] != runs:
            bad = [v for v in report["verdicts"] if v["status"] != "ok"]
            problems.append(f"outloop audit verify over the suite's {runs} runs: exit {completed.returncode}, "
                            f"{json.dumps({k: report[k] for k in ('runs', 'ok', 'incomplete', 'broken')})}, "
                            f"first problems: {bad[:5]}")
        self.verified_runs = runs
        return problems


@pytest.fixture(scope="session")
def canary_collector(request: pytest.FixtureRequest) -> Iterator[CanaryCollector]:
    base = Path(tempfile.mkdtemp(prefix="ol-suite-", dir="/tmp"))
    collector = CanaryCollector(base)
    yield collector
    try:
        problems = collector.finish()
        size = sum(len(data) for _, data in collector.haystacks)
        SUMMARY.append(f"canary collector: {len(collector.canaries)} canary forms searched in "
                       f"{len(collector.haystacks)} haystacks ({size / 1e6:.1f} MB), "
                       f"{len(problems)} problems; `outloop audit verify` over {collector.verified_runs} runs")
        assert problems == [], "\n".join(problems)
    finally:
        shutil.rmtree(base, ignore_errors=True)


SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(line)


@pytest.fixture
def world(request: pytest.FixtureRequest, canary_collector: CanaryCollector) -> Iterator[World]:
    """The shared World, harvested by the session's canary collector when the test is done."""
    with make_world() as w:
        yield w
        canary_collector.harvest(w, request.node.nodeid)


def run_hostile(world: World, source: str, *args: str, flags: Sequence[str] = (), workspace: str = "acme",
                timeout: float = 60, env: dict[str, str] | None = None) -> Result:
    """Run a hostile Python loop under the real `outloop run`; it can `import rawhttp` (copied next to it)."""
    shutil.copy(RAWHTTP, world.work / "rawhttp.py")
    script = world.work / f"hostile-{uuid.uuid4().hex[:8]}.py"
    script.write_text(textwrap.dedent(source))
    return world.run(PYTHON, str(script), *args, workspace=workspace, flags=flags, timeout=timeout, env=env)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
