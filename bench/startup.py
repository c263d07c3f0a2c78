"""Start-up cost: `outloop run -- true` against bare `true`, `outloop --help`, `outloop audit`, import time.

Each command runs N times, interleaved, from a private OUTLOOP_HOME whose profile takes its secret from
`env:VAR`, so no keyring is touched. Wall time includes fork+exec, identical for every row. Reports, never asserts.

    .venv/bin/python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
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
        imports = [importtime("import outloop_cli.cli", env), importtime("import outloop_cli.runner", env)]
        return {"rows": rows, "notes": notes, "imports": imports, "runs": runs}
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
