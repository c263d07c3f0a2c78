"""Start-up cost: `outloop run -- true` against bare `true`, `outloop --help`, `outloop audit`, import time, and
a real loop's first request: how long after its first connect the broker answers it.

Each command runs N times, interleaved, from a private OUTLOOP_HOME whose profile takes its secret from
`env:VAR`, so no keyring is touched. Wall time includes fork+exec, identical for every row. Reports, never asserts.

    .venv/bin/python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTLOOP, PYTHON, WORKSPACE, fmt, median, outloop_env, short_tmpdir, write_bench_profile

Log = Callable[[str], None]
_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")
URL_WORKSPACE = "bench-url"  # the bench profile plus child_env: base-URL mode, with its loopback listener

# The loop: a plain Python child that asks the broker for /v1/run twice, each on a new connection, on the Unix
# socket or on $OUTLOOP_URL with the run token, and prints when it connected and when each answer was complete.
# perf_counter is CLOCK_MONOTONIC, one clock for the bench and the sandboxed child alike.
FIRST_REQUEST_LOOP = """
import json, os, socket, sys, time
started = time.perf_counter()
def ask(mode):
    if mode == "unix":
        sock, target, auth = socket.socket(socket.AF_UNIX), os.environ["OUTLOOP_SOCKET"], ""
    else:
        host, port = os.environ["OUTLOOP_URL"].removeprefix("http://").rsplit(":", 1)
        sock, target = socket.socket(), (host, int(port))
        auth = "Authorization: Bearer " + os.environ["OUTLOOP_TOKEN"] + "\\r\\n"
    connect = time.perf_counter()
    sock.connect(target)
    sock.sendall(("GET /v1/run HTTP/1.1\\r\\nHost: broker\\r\\n" + auth + "Connection: close\\r\\n\\r\\n").encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    done = time.perf_counter()
    sock.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        sys.exit("broker answered " + repr(answer[:80]))
    return [connect, done]
print(json.dumps({"started": started, "first": ask(sys.argv[1]), "second": ask(sys.argv[1])}))
"""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _time(argv: Sequence[str], env: dict[str, str]) -> tuple[float, int]:
    # Not subprocess.run(timeout=...): waiting with a timeout polls with sleeps of up to 50 ms, which would
    # round every figure up to the next poll. A blocking wait plus a watchdog timer measures to the microsecond.
    started = time.perf_counter()
    proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    code = proc.wait()
    elapsed = time.perf_counter() - started
    watchdog.cancel()
    return elapsed, code


def first_request(runs: int, env: dict[str, str], profiles: Path, log: Log = _stderr) -> list[dict[str, Any]]:
    """A real loop's first broker request, in both modes, interleaved: connect -> answer (the first request pays
    for whatever the broker has not loaded yet; the second, on a new connection, is the warm reference), and
    launch -> first answer (start-up counted to the first answered request)."""
    bench = profiles / f"{WORKSPACE}.toml"
    (profiles / f"{URL_WORKSPACE}.toml").write_text(
        bench.read_text() + 'child_env = { BENCH_URL = "{url}", BENCH_TOKEN = "{token}" }\n')
    modes = [("Unix socket", WORKSPACE, "unix"), ("base-URL (loopback TCP)", URL_WORKSPACE, "url")]
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in modes}
    failures: dict[str, str] = {}
    for index in range(runs + 1):  # the first round only warms the page cache
        for label, workspace, mode in modes[index % 2:] + modes[:index % 2]:
            launched = time.perf_counter()
            done = subprocess.run([OUTLOOP, "run", "-w", workspace, "--quiet", "--", PYTHON, "-c", FIRST_REQUEST_LOOP,
                                   mode], env=env, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                failures[label] = f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
                continue
            times = json.loads(done.stdout)
            if index:
                samples[label].append({
                    "child_start_ms": (times["started"] - launched) * 1000,
                    "first_ms": (times["first"][1] - times["first"][0]) * 1000,
                    "second_ms": (times["second"][1] - times["second"][0]) * 1000,
                    "to_first_answer_ms": (times["first"][1] - launched) * 1000,
                })
    rows = []
    for label, _, _ in modes:
        values = samples[label]
        row: dict[str, Any] = {"label": label, "runs": len(values), "failure": failures.get(label)}
        for key in ("child_start_ms", "first_ms", "second_ms", "to_first_answer_ms"):
            row[key] = median([v[key] for v in values])
            row[key.replace("_ms", "_max_ms")] = max((v[key] for v in values), default=float("nan"))
        rows.append(row)
        log(f"  first request, {label:<25} connect->answer median {row['first_ms']:6.1f} ms "
            f"(max {row['first_max_ms']:.1f}), warm {row['second_ms']:.1f} ms")
    return rows


def importtime(statement: str, env: dict[str, str], repeats: int = 3) -> dict[str, Any]:
    """Median self/cumulative microseconds per module over a few runs of `python -X importtime`."""
    per_module: dict[str, list[tuple[int, int]]] = defaultdict(list)
    depth: dict[str, int] = {}
    totals = []
    for _ in range(repeats):
        done = subprocess.run([PYTHON, "-X", "importtime", "-c", statement], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        total = 0
        for line in done.stderr.splitlines():
            match = _IMPORT_LINE.match(line)
            if match:
                self_us, cumulative_us, indent, name = int(match[1]), int(match[2]), match[3], match[4]
                per_module[name].append((self_us, cumulative_us))
                depth[name] = len(indent) // 2
                if depth[name] == 0:
                    total += cumulative_us
        totals.append(total)
    modules = {name: (median([s for s, _ in runs]), median([c for _, c in runs])) for name, runs in per_module.items()}
    by_package: dict[str, float] = defaultdict(float)
    for name, (own_us, _) in modules.items():
        by_package[name.split(".")[0]] += own_us
    return {
        "statement": statement,
        "total_ms": median(totals) / 1000,
        "top_self": sorted(((n, s / 1000, c / 1000) for n, (s, c) in modules.items()), key=lambda r: -r[1])[:10],
        "top_packages": sorted(((p, us / 1000) for p, us in by_package.items()), key=lambda r: -r[1])[:10],
        "top_level": sorted(((n, c / 1000) for n, (_, c) in modules.items() if depth.get(n) == 0),
                            key=lambda r: -r[1])[:10],
    }


def run(runs: int = 15, log: Log = _stderr) -> dict[str, Any]:
    home = short_tmpdir("ols-")
    try:
        write_bench_profile(home / "profiles", "http://127.0.0.1:9")
        env = outloop_env(home)
        true = shutil.which("true") or "/bin/true"
        run_cmd = [OUTLOOP, "run", "-w", WORKSPACE, "--quiet"]
        commands: list[tuple[str, list[str]]] = [
            ("bare `true`", [true]),
            ("`python -c pass` (interpreter floor)", [PYTHON, "-c", "pass"]),
            ("`outloop --version`", [OUTLOOP, "--version"]),
            ("`outloop --help`", [OUTLOOP, "--help"]),
            ("`outloop run -- true` (default network: auto)", [*run_cmd, "--", true]),
            ("`outloop run --network open -- true`", [*run_cmd, "--network", "open", "--", true]),
            ("`outloop run --network broker-only -- true`", [*run_cmd, "--network", "broker-only", "--", true]),
        ]
        notes: list[str] = []
        # One untimed pass warms the page cache and creates audit.db; it also tells which commands work here.
        for label, argv in list(commands):
            _, code = _time(argv, env)
            if code != 0:
                notes.append(f"{label}: exits {code} on this machine; left out of the timings")
                log(f"SKIP {label}: exit {code}")
                commands.remove((label, argv))
        _, audit_help = _time([OUTLOOP, "audit", "--help"], env)
        if audit_help == 0:
            commands.append(("`outloop audit`", [OUTLOOP, "audit"]))
        else:
            notes.append("`outloop audit`: not measured - `outloop audit --help` fails (the command does not "
                         "exist yet)")
            log("SKIP outloop audit: `outloop audit --help` fails")
        samples: dict[str, list[float]] = {label: [] for label, _ in commands}
        failures: dict[str, int] = defaultdict(int)
        for index in range(runs):
            order = commands[index % len(commands):] + commands[: index % len(commands)]
            for label, argv in order:
                seconds, code = _time(argv, env)
                if code == 0:
                    samples[label].append(seconds)
                else:
                    failures[label] += 1
        base = median(samples["bare `true`"])
        rows = []
        for label, _ in commands:
            values = samples[label]
            rows.append({"label": label, "median_ms": median(values) * 1000,
                         "min_ms": min(values) * 1000 if values else float("nan"),
                         "over_true_ms": (median(values) - base) * 1000, "runs": len(values),
                         "failures": failures.get(label, 0)})
            log(f"  {label:<50} median {median(values) * 1000:7.1f} ms")
        first = first_request(runs, env, home / "profiles", log)
        imports = [importtime("import outloop_cli.cli", env), importtime("import outloop_cli.runner", env)]
        return {"rows": rows, "notes": notes, "imports": imports, "runs": runs, "first_request": first}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    lines = [f"Median wall time of {result['runs']} interleaved runs (fork+exec included), bytecode cached as "
             "after `pip install` (under `.bench/pycache`, so a shell with PYTHONDONTWRITEBYTECODE=1 does not time "
             "the compiler).", "",
             "| command | median ms | min ms | over bare `true` ms | failed runs |", "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['label']} | {fmt(row['median_ms'], 1)} | {fmt(row['min_ms'], 1)} | "
                     f"{fmt(row['over_true_ms'], 1)} | {row['failures']} |")
    lines += ["", "A real loop's first broker request (`GET /v1/run` on a new connection, default network, "
              f"median and max of {result['runs']} runs per mode, interleaved): connect -> complete answer, against "
              "the same request made right after it; and from launching `outloop run` to the child's start and to "
              "its first complete answer.", "",
              "| mode | first request ms (max) | second request ms | launch -> child start ms | "
              "launch -> first answer ms |", "|---|---:|---:|---:|---:|"]
    for row in result.get("first_request", []):
        if row["failure"]:
            lines.append(f"| {row['label']} | failed: {row['failure']} | | | |")
            continue
        lines.append(f"| {row['label']} | {fmt(row['first_ms'], 1)} ({fmt(row['first_max_ms'], 1)}) | "
                     f"{fmt(row['second_ms'], 1)} | {fmt(row['child_start_ms'], 1)} | "
                     f"{fmt(row['to_first_answer_ms'], 1)} |")
    for info in result["imports"]:
        lines += ["", f"`python -X importtime -c \"{info['statement']}\"`: {fmt(info['total_ms'], 1)} ms of "
                  "imports (median of 3). Top 10 modules by own import time, and by package:", "",
                  "| module | self ms | cumulative ms |   | package | self ms, all its modules |",
                  "|---|---:|---:|---|---|---:|"]
        for (name, self_ms, cum_ms), (package, package_ms) in zip(info["top_self"], info["top_packages"],
                                                                   strict=False):
            lines.append(f"| `{name}` | {fmt(self_ms, 1)} | {fmt(cum_ms, 1)} |   | `{package}` "
                         f"| {fmt(package_ms, 1)} |")
    if result["notes"]:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(render(run(args.runs)))


if __name__ == "__main__":
    main()
