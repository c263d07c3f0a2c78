"""The central audit database: run start-up with shipping configured, fleet shipping throughput, and a
cross-host query on 10 M central rows.

Starts its own PostgreSQL (Debian's server binaries, initdb + pg_ctl in a temporary directory, as in the tests).

1. Start-up: launch of `outloop run` to the child's first instruction, and the whole run's wall time, with no
   [audit.central], with the server down, and with it up (interleaved, median of --startup-repeat).
2. Shipping: one host's audit.db (the real schema, valid chains, built like bench/audit_query.py) shipped as
   --hosts different host_ids by `outloop audit ship`, --parallel hosts at a time; events/s over the fleet.
3. Query: --rows events generated server-side with generate_series into a fresh central schema, then the
   installed binary times `audit events --central --workspace X --since 7d --decision deny` (start-up included).

Usage: python bench/central.py [--hosts 50] [--events-per-host 200000] [--parallel 4] [--rows 10000000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from audit_query import WORKSPACES, fill
from common import OUTLOOP, PYTHON, machine
from postgres_support import PASSWORD_VARIABLE, Postgres, running_postgres, server_bin

from outloop_cli.audit.central_db import MIGRATIONS
from outloop_cli.audit.central_queries import query_exchanges, recent_runs

QUERY = ["audit", "events", "--central", "--workspace", WORKSPACES[3], "--since", "7d", "--decision", "deny"]
PROFILE = """version = 1
[credentials.api]
secret = "env:BENCH_SECRET"
base_url = "http://127.0.0.1:9"
allow = ["GET /**"]
"""


def home_for(base: Path, server: Postgres | None, dbname: str, host_id: str, *, port: int | None = None) -> Path:
    home = base / host_id
    (home / "profiles").mkdir(parents=True, exist_ok=True)
    (home / "profiles" / "bench.toml").write_text(PROFILE)
    if server is not None:
        dsn = server.dsn(dbname) if port is None else server.dsn(dbname).replace(f":{server.port}/", f":{port}/")
        (home / "config.toml").write_text(f'[audit.central]\ndsn = "{dsn}"\npassword = "env:{PASSWORD_VARIABLE}"\n'
                                          f'host_id = "{host_id}"\n')
    return home


def env_for(home: Path, server: Postgres) -> dict[str, str]:
    return {"OUTLOOP_HOME": str(home), "NO_COLOR": "1", "PATH": "/usr/bin:/bin", PASSWORD_VARIABLE: server.password,
            "BENCH_SECRET": "x", "HOME": str(home)}


def startup(server: Postgres, dbname: str, base: Path, repeat: int) -> None:
    down_port = server.port + 1 if server.port < 65535 else server.port - 1  # nothing listens there: refused
    homes = {"no [audit.central]": home_for(base, None, dbname, "off"),
             "server down": home_for(base, server, dbname, "down", port=down_port),
             "server up": home_for(base, server, dbname, "up")}
    child = [PYTHON, "-S", "-c", "import sys, time; print(time.time()); time.sleep(float(sys.argv[1]))"]
    start: dict[str, list[float]] = {name: [] for name in homes}
    total: dict[str, dict[str, list[float]]] = {length: {name: [] for name in homes} for length in ("0", "1")}
    for _ in range(repeat):
        for length in total:
            for name, home in homes.items():
                launched = time.time()
                done = subprocess.run([OUTLOOP, "run", "-w", "bench", "-q", "--", *child, length],
                                      env=env_for(home, server), capture_output=True, text=True, check=True)
                ended = time.time()
                start[name].append(float(done.stdout.strip()) - launched)
                total[length][name].append(ended - launched - float(length))
    print(f"\n1. `outloop run` start-up (launch to the child's first line, {2 * repeat} runs) and the whole run less "
          f"the child's own sleep ({repeat} runs each), medians")
    print(f"{'configuration':<22} {'start-up':>10} {'run, 0 s child':>15} {'run, 1 s child':>15}")
    for name in homes:
        print(f"{name:<22} {statistics.median(start[name]) * 1000:>8.1f}ms "
              f"{statistics.median(total['0'][name]) * 1000:>13.1f}ms "
              f"{statistics.median(total['1'][name]) * 1000:>13.1f}ms")


def fresh_central(server: Postgres, base: Path) -> str:
    dbname = server.create_database()
    home = home_for(base, server, dbname, f"init-{dbname}")
    subprocess.run([OUTLOOP, "audit", "central", "init"], env=env_for(home, server), check=True, capture_output=True)
    return str(dbname)


def shipping(server: Postgres, base: Path, hosts: int, per_host: int, parallel: int) -> None:
    dbname = fresh_central(server, base)
    source = base / "source" / "audit.db"
    source.parent.mkdir(parents=True)
    events_per_run = 500
    started = time.perf_counter()
    fill(source, max(1, per_host // events_per_run), events_per_run)
    with sqlite3.connect(source) as conn:
        events = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    print(f"\n2. shipping: built one host's audit.db ({events:,} events) in {time.perf_counter() - started:.0f}s")
    slots = []
    for slot in range(parallel):
        home = home_for(base, server, dbname, f"slot{slot}")
        shutil.copyfile(source, home / "audit.db")
        slots.append(home)

    def ship(index: int) -> float:
        home = slots[index % parallel]
        with sqlite3.connect(home / "audit.db") as conn:
            conn.execute("DELETE FROM shipped")  # the same events, shipped again as another host
        config = home / "config.toml"
        config.write_text("\n".join(line if not line.startswith("host_id") else f'host_id = "host-{index:03d}"'
                                    for line in config.read_text().splitlines()) + "\n")
        began = time.perf_counter()
        subprocess.run([OUTLOOP, "audit", "ship"], env=env_for(home, server), capture_output=True, check=True)
        return time.perf_counter() - began

    began = time.perf_counter()
    durations: list[float] = []
    for wave in range(0, hosts, parallel):
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            durations += pool.map(ship, range(wave, min(hosts, wave + parallel)))
    elapsed = time.perf_counter() - began
    with server.connect(dbname) as conn:
        central = int(conn.execute("SELECT count(*) FROM outloop.events").fetchone()[0])
    assert central == events * hosts, (central, events * hosts)
    print(f"   {hosts} hosts x {events:,} events = {central:,} central rows in {elapsed:.0f}s, {parallel} hosts at a "
          f"time: {central / elapsed:,.0f} events/s over the fleet; one host's ship: median "
          f"{statistics.median(durations):.1f}s ({events / statistics.median(durations):,.0f} events/s)")


def query(server: Postgres, base: Path, rows: int, repeat: int) -> None:
    dbname = fresh_central(server, base)
    home = home_for(base, server, dbname, "query")
    indexes = [s for s in MIGRATIONS[0] if s.startswith("CREATE INDEX")]
    began = time.perf_counter()
    with server.connect(dbname) as conn:
        for statement in indexes:
            conn.execute(f"DROP INDEX outloop.{statement.split()[2]}")
        # 50 hosts, runs of 500 events, 20 workspaces, one request in five denied, 60 days back from now.
        conn.execute("""
            INSERT INTO outloop.events (host_id, run_id, seq, ts, kind, workspace, credential, method, host, path,
                                        decision, reason, rule, status, prev_hash, hash)
            SELECT 'host-' || (i %% 50), 'RUN' || (i / 500), i %% 500,
                   extract(epoch FROM now()) - 60 * 86400 + 60 * 86400.0 * i / %s,
                   CASE WHEN i %% 500 = 0 THEN 'run_start' ELSE 'request' END,
                   'client' || lpad(((i / 500) %% 20)::text, 2, '0'), 'crm', 'GET', 'api.example.com',
                   '/v1/things/' || i, CASE WHEN i %% 5 = 3 THEN 'deny' ELSE 'allow' END,
                   CASE WHEN i %% 5 = 3 THEN 'deny_rule' ELSE 'rule_match' END, NULL,
                   CASE WHEN i %% 5 = 3 THEN 403 END, md5(i::text), md5((i + 1)::text)
            FROM generate_series(0, %s - 1) AS i""", (rows, rows))
        loaded = time.perf_counter() - began
        for statement in indexes:
            conn.execute(statement)
        conn.execute("ANALYZE outloop.events")
    print(f"\n3. query: {rows:,} central rows generated in {loaded:.0f}s, indexed and analysed in "
          f"{time.perf_counter() - began - loaded:.0f}s")
    with server.connect(dbname) as conn:
        for name, work in (("query_exchanges (the SQL of the first command)", lambda: query_exchanges(
                               conn, workspace=WORKSPACES[3], decision="deny", since=time.time() - 7 * 86400,
                               limit=50)),
                           ("recent_runs (the SQL of `audit --central`)", lambda: recent_runs(conn, limit=20))):
            times = []
            for _ in range(repeat):
                began = time.perf_counter()
                work()
                times.append(time.perf_counter() - began)
            print(f"   in-process {name:<70} median {statistics.median(times):.3f}s  max {max(times):.3f}s")
    for command in (QUERY, ["audit", "--central"], ["audit", "show", "--central", "last"]):
        times = []
        for _ in range(repeat):
            began = time.perf_counter()
            subprocess.run([OUTLOOP, *command], env=env_for(home, server), capture_output=True, check=True)
            times.append(time.perf_counter() - began)
        print(f"   outloop {' '.join(command):<80} median {statistics.median(times):.3f}s  max {max(times):.3f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--events-per-host", type=int, default=200_000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--startup-repeat", type=int, default=20)
    parser.add_argument("--skip", action="append", default=[], choices=("startup", "shipping", "query"))
    args = parser.parse_args()
    bin_dir = server_bin()
    if bin_dir is None:
        print("PostgreSQL server binaries are missing: apt-get install postgresql", file=sys.stderr)
        return 1
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    base = Path(tempfile.mkdtemp(prefix="ol-bc-", dir="/tmp"))
    try:
        with running_postgres(bin_dir) as server:
            if "startup" not in args.skip:
                startup(server, fresh_central(server, base), base, args.startup_repeat)
            if "shipping" not in args.skip:
                shipping(server, base, args.hosts, args.events_per_host, args.parallel)
            if "query" not in args.skip:
                query(server, base, args.rows, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
