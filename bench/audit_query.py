"""Acceptance 3 of the operator commands: `audit` stays fast on a big audit log.

Fills a fresh audit.db (the real schema and migrations, real hash chains that `audit verify` accepts) with
1,000,000 events over 2,000 runs, then times the installed `outloop` binary, start-up included, on:
`audit`, `audit show last`, `audit events --workspace X --decision deny --since 7d`, and the failure filters
(`--failed`, `--status`) of `audit` and `audit events`. Each must stay under 0.5 s.
Usage: python bench/audit_query.py [--runs N] [--events-per-run M] [--repeat K] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from outloop_cli.audit.chain import EVENT_COLUMNS, GENESIS_HASH, canonical_json, event_hash
from outloop_cli.audit.writer import RunLog

LIMIT_SECONDS = 0.5
WORKSPACES = [f"client{i:02d}" for i in range(20)]
CREDENTIALS = ("crm", "mail", "llm")
SPAN_SECONDS = 60 * 86400.0  # runs spread over the last 60 days, so --since 7d selects about an eighth
OUTLOOP = str(Path(sys.executable).parent / "outloop")
_INSERT = (f"INSERT INTO events ({', '.join((*EVENT_COLUMNS, 'hash'))}) "
           f"VALUES ({', '.join('?' * (len(EVENT_COLUMNS) + 1))})")
_RUN_INSERT = ("INSERT INTO runs (run_id, workspace, command, started_at, ended_at, exit_code, duration, allowed, "
               "denied, errors, sandbox, head_hash, event_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
ERROR_EVERY = 97  # about one allowed request in a hundred fails upstream (a 401 or a 503)
SANDBOX = {"environment": "stripped", "network": "broker-only (bubblewrap)"}
COMMAND = ["python", "loop.py"]


def create_schema(db: Path) -> None:
    """Let the real writer create and migrate the database, exactly as the first `outloop run` would."""
    log = RunLog.start(db, run_id="00000000000000000000000000", workspace=WORKSPACES[0], command=COMMAND,
                       detail={"sandbox": SANDBOX})
    log.finish(exit_code=0, duration=0.1, detail={})


def run_rows(index: int, started: float, events: int) -> tuple[list[tuple[object, ...]], tuple[object, ...]]:
    """One finished run's events with a valid hash chain (as RunLog would write them) and its runs row."""
    run_id = f"01BENCH{index:019d}"
    workspace = WORKSPACES[index % len(WORKSPACES)]
    rows: list[tuple[object, ...]] = []
    head, allowed, denied, errors = GENESIS_HASH, 0, 0, 0
    ts = started

    def add(kind: str, **fields: object) -> None:
        nonlocal head
        row: dict[str, object] = dict.fromkeys(EVENT_COLUMNS)
        row.update(fields, run_id=run_id, seq=len(rows), ts=round(ts, 6), kind=kind, workspace=workspace,
                   prev_hash=head)
        head = event_hash(row)
        rows.append((*row.values(), head))

    add("run_start", detail=canonical_json({"command": COMMAND, "sandbox": SANDBOX, "pid": 1}))
    request_seq = 0
    while len(rows) < events - 1:
        ts += 0.05
        credential = CREDENTIALS[len(rows) % len(CREDENTIALS)]
        if len(rows) % 10 == 3:  # about one request in five is denied
            denied += 1
            add("request", credential=credential, method="POST", host="api.example.com",
                path=f"/v1/things/{len(rows)}/merge", decision="deny", reason="deny_rule", rule="* /**/merge",
                status=403)
            continue
        allowed += 1
        request_seq = len(rows)
        add("request", credential=credential, method="GET", host="api.example.com", path=f"/v1/things/{len(rows)}",
            decision="allow", reason="rule_match", rule="GET /v1/things/*")
        if len(rows) < events - 1:
            status = 200 if (index + request_seq) % ERROR_EVERY else (401 if request_seq % 2 else 503)
            errors += status != 200
            add("response", credential=credential, method="GET", host="api.example.com",
                path=f"/v1/things/{request_seq}", request_seq=request_seq, status=status, latency_ms=12.5,
                bytes_in=120, bytes_out=2048)
    duration = ts - started
    end_detail = {"exit_code": 0, "duration": duration, "allowed": allowed, "denied": denied, "errors": errors,
                  "lost_events": 0, "head_hash": head, "event_count": len(rows)}
    ts += 0.01
    add("run_end", detail=canonical_json(end_detail))
    run = (run_id, workspace, canonical_json(COMMAND), started, round(ts, 6), 0, duration, allowed, denied, errors,
           canonical_json(SANDBOX), head, len(rows))
    return rows, run


def fill(db: Path, runs: int, events_per_run: int) -> None:
    create_schema(db)
    now = time.time()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # only the fill is unsafe; the timed reads use outloop's settings
    for batch in _batches(range(1, runs + 1), 100):
        conn.execute("BEGIN")
        for index in batch:
            started = now - SPAN_SECONDS + SPAN_SECONDS * index / (runs + 1)
            rows, run = run_rows(index, started, events_per_run)
            conn.executemany(_INSERT, rows)
            conn.execute(_RUN_INSERT, run)
        conn.execute("COMMIT")
        print(f"\r  filled {batch[-1]}/{runs} runs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    # No ANALYZE: outloop never runs it, so the timed queries must be fast on the indexes alone.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _batches(items: range, size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def time_command(home: Path, args: list[str], repeat: int) -> list[float]:
    env = {"OUTLOOP_HOME": str(home), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        completed = subprocess.run([OUTLOOP, *args], env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        if completed.returncode != 0:
            raise SystemExit(f"outloop {' '.join(args)} failed ({completed.returncode}): {completed.stderr}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--events-per-run", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the database in this directory and keep it")
    args = parser.parse_args()
    home = args.keep or Path(tempfile.mkdtemp(prefix="outloop-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    db = home / "audit.db"
    try:
        if not db.exists():
            started = time.perf_counter()
            fill(db, args.runs, args.events_per_run)
            print(f"  built {db} in {time.perf_counter() - started:.0f}s, {db.stat().st_size / 2**20:.0f} MiB",
                  file=sys.stderr)
        conn = sqlite3.connect(db)
        total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        run_count = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        conn.close()
        commands = [
            ["audit"],
            ["audit", "show", "last"],
            ["audit", "events", "--workspace", WORKSPACES[3], "--decision", "deny", "--since", "7d"],
            ["audit", "--failed"],
            ["audit", "--status", "401"],
            ["audit", "events", "--failed"],
            ["audit", "events", "--status", "5xx"],
            ["audit", "events", "--status", "404"],  # matches nothing: the worst case for a filter
            ["audit", "show", f"01BENCH{2000:019d}"[:-1]],  # the prefix of one run's id, resolved like git's
        ]
        print(f"audit.db: {total:,} events over {run_count:,} runs; wall time of the `outloop` binary, "
              f"start-up included, {args.repeat} runs each")
        print(f"{'command':<72} {'median':>8} {'max':>8}")
        failed = False
        for command in commands:
            times = time_command(home, command, args.repeat)
            slow = max(times) >= LIMIT_SECONDS
            failed |= slow
            print(f"{'outloop ' + ' '.join(command):<72} {statistics.median(times):>7.3f}s {max(times):>7.3f}s"
                  + ("  OVER 0.5 s" if slow else ""))
        return 1 if failed else 0
    finally:
        if args.keep is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
