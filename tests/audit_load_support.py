"""Helpers for the audit-under-load tests: a loop that fires many concurrent requests, and what to check after.

The loop runs under a real `outloop run`; each request has a path of its own, so a request the upstream
received can be matched to its audit row by path alone.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from conftest import OUTLOOP, PYTHON, World, parse_json_lines

CONTACTS = "/crm/v3/objects/contacts/"

# argv: tag, requests, threads, progress file. Each thread keeps one keep-alive connection (the client gives
# every thread its own) and sends its share of requests one after another, each to a path naming tag and
# number. Every answered request is appended to the progress file as it arrives, so a test can wait on
# progress; at the end, a JSON line with the statuses counted and the latencies seen (for the benchmark notes).
LOAD_LOOP = """
    import json, sys, threading, time
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor
    from outloop_cli.client import Outloop, OutloopClientError

    tag, total, threads, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    client = Outloop()
    out = open(progress, "a", buffering=1)
    lock = threading.Lock()
    statuses = Counter()
    latencies, firsts = [], []  # ms; each thread's first request (a new connection, maybe the broker's import) apart

    def worker(k):
        for i in range(k, total, threads):
            started = time.perf_counter()
            try:
                status = client.request("crm", "GET", f"/crm/v3/objects/contacts/{tag}-{i}").status
            except OutloopClientError:
                return
            took = (time.perf_counter() - started) * 1000
            with lock:
                statuses[status] += 1
                (latencies if i >= threads else firsts).append(took)
                out.write(f"{tag}-{i} {status}\\n")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    latencies.sort()
    at = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None
    print(json.dumps({"statuses": statuses, "latency_ms": {"p50": at(0.5), "p99": at(0.99), "max": at(1.0),
                                                           "first": round(max(firsts, default=0), 2)}}))
"""


def load_command(world: World, tag: str, total: int, threads: int) -> list[str]:
    """The command line of a LOAD_LOOP run (one script file in the work dir, shared by every run)."""
    script = world.work / "load_loop.py"
    if not script.exists():
        script.write_text(textwrap.dedent(LOAD_LOOP))
    return [PYTHON, str(script), tag, str(total), str(threads), str(world.work / f"progress-{tag}")]


def start_load(world: World, tag: str, total: int, threads: int) -> subprocess.Popen[bytes]:
    """`outloop run` of LOAD_LOOP in its own session, not waited for."""
    return subprocess.Popen([OUTLOOP, "run", "-w", "acme", "--profiles", str(world.profiles), "--",
                             *load_command(world, tag, total, threads)], env=world.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=world.work)


def kill_outloop(process: subprocess.Popen[bytes], tag: str) -> None:
    """kill -9 of outloop alone, as a crash or an OOM kill would do it; then wait for its loop to be gone too."""
    import psutil

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    # The sandboxed loop dies with outloop; without a sandbox it would notice the dead socket. Either way it must
    # be gone before the test reads what the run left.
    leftovers = [found for found in psutil.process_iter(["cmdline"])
                 if "load_loop.py" in " ".join(found.info["cmdline"] or []) and tag in (found.info["cmdline"] or [])]
    for found in leftovers:
        found.kill()
    psutil.wait_procs(leftovers, timeout=10)


def forwarded(world: World, tag: str) -> int:
    """How many of a run's requests (by the tag in their paths) the upstream has received."""
    marker = f"{CONTACTS}{tag}-"
    return sum(1 for request in list(world.upstream.requests) if request.path.startswith(marker))


def committed(db: Path, tag: str) -> int:
    """How many of a run's `allow` decisions are committed (what another process sees in audit.db)."""
    conn = sqlite3.connect(db)
    try:
        (count,) = conn.execute("SELECT count(*) FROM events WHERE kind = 'request' AND decision = 'allow' "
                                "AND path GLOB ?", (f"{CONTACTS}{tag}-*",)).fetchone()
    finally:
        conn.close()
    return int(count)


def statuses(output: str) -> Counter[int]:
    """The loop's closing line: how many answers of each status it got."""
    lines = parse_json_lines(output)
    assert lines, f"the loop printed no summary: {output!r}"
    return Counter({int(status): count for status, count in lines[-1]["statuses"].items()})


@dataclass(frozen=True)
class RunCounts:
    """One run as stored: its runs row's counts against the events actually present."""

    run_id: str
    allowed: int
    denied: int
    event_count: int | None
    ended: bool
    requests: int
    allowed_requests: int
    responses: int
    events: int
    lost_events: object


def run_counts(db: Path) -> list[RunCounts]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT r.run_id, r.allowed, r.denied, r.event_count, r.ended_at IS NOT NULL, "
            "(SELECT count(*) FROM events e WHERE e.run_id = r.run_id AND e.kind = 'request'), "
            "(SELECT count(*) FROM events e WHERE e.run_id = r.run_id AND e.kind = 'request' "
            " AND e.decision = 'allow'), "
            "(SELECT count(*) FROM events e WHERE e.run_id = r.run_id AND e.kind = 'response'), "
            "(SELECT count(*) FROM events e WHERE e.run_id = r.run_id), "
            "(SELECT json_extract(detail, '$.lost_events') FROM events e WHERE e.run_id = r.run_id "
            " AND e.kind = 'run_end') "
            "FROM runs r ORDER BY r.run_id"
        ).fetchall()
    finally:
        conn.close()
    return [RunCounts(row[0], row[1], row[2], row[3], bool(row[4]), *row[5:]) for row in rows]


def committed_allows(db: Path) -> set[str]:
    """The upstream paths of every committed `allow` request row, across runs."""
    conn = sqlite3.connect(db)
    try:
        return {str(path) for (path,) in conn.execute(
            "SELECT path FROM events WHERE kind = 'request' AND decision = 'allow'")}
    finally:
        conn.close()


def forwarded_without_audit(world: World, db: Path) -> list[str]:
    """Paths the upstream received with no committed `allow` row: must be empty (the forward never precedes
    the commit). The upstream keeps its records across outloop's death, so this holds after kill -9 too."""
    allowed = committed_allows(db)
    received = [request.path.partition("?")[0] for request in world.upstream.requests]
    return sorted(path for path in received if path not in allowed)


def verify_statuses(world: World, home: Path | None = None) -> tuple[int, dict[str, str]]:
    """`outloop audit verify --json` over every run: its exit code, and run id -> status."""
    env = world.env if home is None else {**world.env, "OUTLOOP_HOME": str(home)}
    result = world.outloop("audit", "verify", "--json", env=env)
    verdicts = json.loads(result.out)["verdicts"]
    return result.code, {str(verdict["run_id"]): str(verdict["status"]) for verdict in verdicts}
