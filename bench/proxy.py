"""The egress proxy's cost: a kept-alive intercepted HTTPS request, and a new connection (CONNECT + TLS + request).

The same client (`http.client`, one connection, sequential requests) runs against the bench's HTTPS upstream
(`upstream.py --tls`, certificate from a test CA made with `cryptography`), both ways in each of 3 interleaved
rounds (the order alternating):
- **direct**: outside outloop, sending the secret itself;
- **through the proxy**: as the loop of a real `outloop run` with the network isolated, `HTTPS_PROXY` set by
  outloop, the credential injected by the broker (the upstream answers 401 without it, so a 200 proves it).
Each request is timed by the client. Each figure is the median over the rounds; "added" is the median of each
round's difference of the p50s.

`--startup` instead times what the proxy adds to a run's start-up: `outloop run -- true` with the network
isolated, `[run] proxy = false` against the default (proxy on: the relay opens its listener and hands it to the
broker), and with an https credential (the run's CA is minted too). The variants run interleaved, round by
round, and each round's difference to "proxy off" is taken, so load that comes and goes hits both sides of a pair
alike.

    .venv/bin/python bench/proxy.py [--requests N] [--connections N] [--rounds N] [--startup RUNS]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ca_support import make_test_ca
from common import BENCH_DIR, OUTLOOP, PYTHON, SECRET, SECRET_ENV, fmt, median, short_tmpdir

CLIENT = r'''
import http.client, json, os, ssl, sys, time

host, cafile = sys.argv[1], sys.argv[5]
port, requests, connections = (int(arg) for arg in sys.argv[2:5])
proxy = os.environ.get("HTTPS_PROXY")
context = ssl.create_default_context(cafile=cafile if not proxy else None)  # through outloop: SSL_CERT_FILE
headers = {} if proxy else {"Authorization": "Bearer " + os.environ["BENCH_SECRET"]}


def connect():
    if not proxy:
        return http.client.HTTPSConnection(host, port, context=context)
    proxy_port = int(proxy.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context)
    conn.set_tunnel(host, port)
    return conn


def one(conn):
    conn.request("GET", "/v1/contacts/51", headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"status {response.status}")


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


conn = connect()
for _ in range(200):
    one(conn)
kept = []
for _ in range(requests):
    started = time.perf_counter()
    one(conn)
    kept.append(time.perf_counter() - started)
conn.close()
fresh = []
for _ in range(connections):
    started = time.perf_counter()
    conn = connect()
    one(conn)
    fresh.append(time.perf_counter() - started)
    conn.close()
result = {"kept_p50": p(kept, 0.5), "kept_p99": p(kept, 0.99), "new_p50": p(fresh, 0.5), "new_p99": p(fresh, 0.99)}
if os.environ.get("API_URL"):  # reference: base-URL mode in the same namespace, plain HTTP on the child's side
    authority, _, prefix = os.environ["API_URL"][len("http://"):].partition("/")
    plain = http.client.HTTPConnection(*authority.split(":"))
    auth = {"Authorization": "Bearer " + os.environ["API_TOKEN"]}
    based = []
    for index in range(200 + requests):
        started = time.perf_counter()
        plain.request("GET", "/" + prefix + "/v1/contacts/51", headers=auth)
        response = plain.getresponse()
        response.read()
        if index >= 200:
            based.append(time.perf_counter() - started)
    result.update(base_p50=p(based, 0.5), base_p99=p(based, 0.99))
print(json.dumps(result))
'''


def run(requests: int = 2000, connections: int = 200, rounds: int = 3, log: Any = print) -> dict[str, Any]:
    """Direct and through the proxy, `rounds` times interleaved (the order alternating), as the other benches do:
    each figure is the median over the rounds, and "added" the median of each round's difference, so load that
    comes and goes hits both sides of a pair alike."""
    tmp = short_tmpdir("ol-bench-proxy-")
    try:
        ca = make_test_ca(tmp)
        upstream = subprocess.Popen([PYTHON, str(BENCH_DIR / "upstream.py"), "--tls", str(ca.server_pem)],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert upstream.stdout is not None
            port = json.loads(upstream.stdout.readline())["port"]
            work = tmp / "work"  # the loop's working dir: the workspace view shows it (and not outloop's home)
            work.mkdir()
            client = work / "client.py"
            client.write_text(CLIENT)
            argv = [PYTHON, str(client), "localhost", str(port), str(requests), str(connections), str(ca.ca_pem)]
            home = tmp / "home"
            profiles = home / "profiles"
            profiles.mkdir(parents=True)
            (profiles / "bench.toml").write_text(textwrap.dedent(f"""\
                version = 1
                [credentials.api]
                secret = "env:{SECRET_ENV}"
                base_url = "https://localhost:{port}"
                ca_file = "{ca.ca_pem}"
                allow = ["GET /v1/**"]
                child_env = {{ API_URL = "{{url}}", API_TOKEN = "{{token}}" }}
            """))
            env = {key: value for key, value in os.environ.items() if not key.startswith("OUTLOOP_")}
            env.update({"OUTLOOP_HOME": str(home), SECRET_ENV: SECRET})

            def direct() -> dict[str, float]:
                return _json(subprocess.run(argv, capture_output=True, text=True, timeout=600,
                                            env={**os.environ, "BENCH_SECRET": SECRET}))

            def proxied() -> dict[str, float]:
                return _json(subprocess.run([OUTLOOP, "run", "-w", "bench", "--profiles", str(profiles), "--quiet",
                                             "--", *argv], capture_output=True, text=True, timeout=600, env=env,
                                            cwd=work))

            pairs: list[tuple[dict[str, float], dict[str, float]]] = []
            for index in range(rounds):
                log(f"proxy bench: round {index + 1} of {rounds}, direct and through the egress proxy")
                if index % 2:
                    through = proxied()
                    pairs.append((direct(), through))
                else:
                    alone = direct()
                    pairs.append((alone, proxied()))
        finally:
            upstream.terminate()
            upstream.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    directs, proxies = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    return {"requests": requests, "connections": connections, "rounds": rounds,
            "direct": {key: median([one[key] for one in directs]) for key in directs[0]},
            "proxy": {key: median([one[key] for one in proxies]) for key in proxies[0]},
            "added_kept_p50": median([through["kept_p50"] - alone["kept_p50"] for alone, through in pairs]),
            "added_new_p50": median([through["new_p50"] - alone["new_p50"] for alone, through in pairs]),
            "added_kept_p50_rounds": [through["kept_p50"] - alone["kept_p50"] for alone, through in pairs]}


STARTUP_VARIANTS = {
    "proxy off (`[run] proxy = false`)": ("http://127.0.0.1:9", "proxy = false"),
    "proxy on (default)": ("http://127.0.0.1:9", ""),
    "proxy on, https credential (run CA minted)": ("https://api.example.com", ""),
}


def startup(runs: int = 30, log: Any = print) -> dict[str, Any]:
    """Median wall time of `outloop run -- true` per variant, and the median of each round's difference to
    proxy off (paired: the rounds interleave the variants)."""
    tmp = short_tmpdir("ol-bench-pstart-")
    try:
        profiles = tmp / "home" / "profiles"
        profiles.mkdir(parents=True)
        names = {}
        for index, (label, (base_url, run_line)) in enumerate(STARTUP_VARIANTS.items()):
            names[label] = f"v{index}"
            (profiles / f"v{index}.toml").write_text(textwrap.dedent(f"""\
                version = 1
                [run]
                network = "broker-only"
                {run_line}
                [credentials.api]
                secret = "env:{SECRET_ENV}"
                base_url = "{base_url}"
                allow = ["GET /v1/**"]
            """))
        env = {key: value for key, value in os.environ.items() if not key.startswith("OUTLOOP_")}
        env.update({"OUTLOOP_HOME": str(tmp / "home"), SECRET_ENV: SECRET, "NO_COLOR": "1"})
        true = shutil.which("true") or "/bin/true"
        labels = list(STARTUP_VARIANTS)
        samples: dict[str, list[float]] = {label: [] for label in labels}
        cpu: dict[str, list[float]] = {label: [] for label in labels}

        def once(label: str) -> float:
            argv = [OUTLOOP, "run", "-w", names[label], "--profiles", str(profiles), "--quiet", "--", true]
            # A blocking wait: one with a timeout polls with sleeps, which would round the figures up.
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            code = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).wait()
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree: each parent waited for its own
            cpu[label].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            if code != 0:
                again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
                raise RuntimeError(f"{label}: exit {code}: {again.stderr[-800:]}")
            return elapsed

        for label in labels:  # warm the page cache, create audit.db
            once(label)
            cpu[label].clear()
        log(f"proxy start-up bench: {runs} rounds of {len(labels)} runs")
        for index in range(runs):
            for label in labels[index % len(labels):] + labels[:index % len(labels)]:
                samples[label].append(once(label))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    off, off_cpu = samples[labels[0]], cpu[labels[0]]
    return {"runs": runs, "rows": [
        {"label": label, "median_ms": median(samples[label]) * 1000,
         "paired_added_ms": median([on - base for on, base in zip(samples[label], off, strict=True)]) * 1000,
         "cpu_ms": median(cpu[label]) * 1000,
         "paired_added_cpu_ms": median([on - base for on, base in zip(cpu[label], off_cpu, strict=True)]) * 1000}
        for label in labels]}


def render_startup(result: dict[str, Any]) -> str:
    lines = [f"`outloop run -- true`, network isolated, {result['runs']} interleaved rounds; \"added\" is the median "
             "of each round's difference to proxy off. CPU is the whole process tree's (user + system).", "",
             "| variant | median ms | added ms (paired) | CPU ms | added CPU ms (paired) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['label']} | {fmt(row['median_ms'], 1)} | {fmt(row['paired_added_ms'], 1)} | "
              f"{fmt(row['cpu_ms'], 1)} | {fmt(row['paired_added_cpu_ms'], 1)} |" for row in result["rows"]]
    return "\n".join(lines)


def _json(completed: subprocess.CompletedProcess[str]) -> dict[str, float]:
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"bench client failed ({completed.returncode}): {completed.stderr[-1500:]}")
    return dict(json.loads(lines[-1]))


def render(result: dict[str, Any]) -> str:
    direct, proxy = result["direct"], result["proxy"]
    proxy.setdefault("base_p50", float("nan"))
    proxy.setdefault("base_p99", float("nan"))
    return "\n".join([
        f"One `http.client` connection, sequential requests ({result['requests']} kept-alive, "
        f"{result['connections']} new connections), HTTPS upstream on 127.0.0.1, times in ms as the client saw "
        f"them; medians of {result['rounds']} interleaved rounds, \"added\" the median of each round's difference "
        f"(kept-alive, per round: {', '.join(fmt(value, 3) for value in result['added_kept_p50_rounds'])}).",
        "",
        "| path | kept-alive p50 | kept-alive p99 | new connection p50 | new connection p99 |",
        "|---|---:|---:|---:|---:|",
        f"| direct (client sends the key) | {fmt(direct['kept_p50'], 3)} | {fmt(direct['kept_p99'], 3)} | "
        f"{fmt(direct['new_p50'], 3)} | {fmt(direct['new_p99'], 3)} |",
        f"| through the egress proxy (intercepted, injected) | {fmt(proxy['kept_p50'], 3)} | "
        f"{fmt(proxy['kept_p99'], 3)} | {fmt(proxy['new_p50'], 3)} | {fmt(proxy['new_p99'], 3)} |",
        f"| **added by the proxy** | **{fmt(result['added_kept_p50'], 3)}** | | "
        f"**{fmt(result['added_new_p50'], 3)}** | |",
        f"| reference: base-URL mode in the same namespace (plain HTTP child-side) | {fmt(proxy['base_p50'], 3)} | "
        f"{fmt(proxy['base_p99'], 3)} | | |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--startup", type=int, metavar="RUNS", help="time start-up instead, RUNS rounds")
    args = parser.parse_args()
    if args.startup:
        print(render_startup(startup(args.startup, log=lambda message: print(message, file=sys.stderr))))
        return
    result = run(args.requests, args.connections, args.rounds, log=lambda message: print(message, file=sys.stderr))
    print(render(result))


if __name__ == "__main__":
    main()
