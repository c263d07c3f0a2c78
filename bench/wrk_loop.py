"""`wrk` as the loop: outloop in base-URL mode next to nginx and direct, interleaved, one upstream for all three.

Each cell is one fresh process tree running the same shell script: one timed `curl` (a new connection's first
request, connect to answer; it doubles as the warm-up) and then `wrk --latency` with a small Lua `done()` that
prints exact percentiles and the max. For outloop the script is the loop: `outloop run -w bench -- sh -c ...`
with the default sandbox (isolated network, base-URL listener in the child's namespace), reaching the upstream
through `$UP_URL` with `Authorization: Bearer $UP_TOKEN` (the profile's `child_env`), so the curl times a fresh
run's first request.
nginx gets the same script against a private nginx that injects the header; direct sends the key itself.
The upstream is nginx `return 200` with the canned body (401 without the bench secret), else `upstream.py`.

    .venv/bin/python bench/wrk_loop.py [--rounds 3] [--duration 5] [--long 30] [--quick]

It reports and never asserts: a missing wrk, curl or nginx is a line in the report.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker import Child
from common import (
    BENCH_DIR,
    OUTLOOP,
    PYTHON,
    SECRET,
    WORKSPACE,
    fmt,
    median,
    outloop_env,
    process_cpu_seconds,
    short_tmpdir,
    system_busy_seconds,
    which,
    write_bench_profile,
)
from nginx import Nginx, canned_upstream_config, proxy_config

Log = Callable[[str], None]
CONCURRENCY = (1, 8)
THREADS = {1: 1, 8: 2}  # wrk threads per connection count: the same for every target
PATH = "/v1/contacts/51?properties=email,firstname"
GOALS = {"vs_nginx_8": 0.25, "added_p50_ms": 0.5, "added_p99_ms": 2.0, "max_ms": 50.0, "first_ms": 50.0}

# wrk calls done() once, after the threads join, with the merged (and latency-corrected) statistics.
DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"wrk": 1, "requests": %d, "duration_us": %d, "min_us": %d, "mean_us": %.1f, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency.min, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
FIRST_FORMAT = "first %{http_code} %{time_connect} %{time_total}\\n"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Target:
    key: str  # direct | nginx | outloop
    label: str
    base: str  # shell word: the base URL the path is appended to
    token: str  # shell word: what follows `Authorization: Bearer `
    wrapped: bool  # the script runs as the loop of `outloop run`


def loop_script(target: Target, connections: int, seconds: float, lua: Path) -> str:
    """The same script for every target; only the base URL and the bearer differ."""
    return "\n".join([
        f"base={target.base}; token={target.token}",
        f'url="$base"{shlex.quote(PATH)}',
        f"curl -sS -o /dev/null --max-time 30 -w {shlex.quote(FIRST_FORMAT)} "
        '-H "Authorization: Bearer $token" "$url" || echo "first failed"',
        f"exec wrk -t{THREADS.get(connections, 2)} -c{connections} -d{seconds:g}s --timeout 30s --latency "
        f'-s {shlex.quote(str(lua))} -H "Authorization: Bearer $token" "$url"',
    ])


def parse(stdout: str) -> dict[str, Any]:
    """The curl line and wrk's done() line; what is missing becomes an "error" entry."""
    out: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("first "):
            parts = line.split()
            if len(parts) == 4 and parts[1].isdigit():
                out["first_status"] = int(parts[1])
                out["first_ms"] = float(parts[3]) * 1000
        elif line.startswith('{"wrk"'):
            stats = json.loads(line)
            seconds = stats["duration_us"] / 1e6
            out.update({
                "requests": stats["requests"], "seconds": seconds,
                "rps": stats["requests"] / seconds if seconds else float("nan"),
                **{f"{k[:-3]}_ms": stats[k] / 1000 for k in ("min_us", "mean_us", "p50_us", "p90_us", "p99_us",
                                                              "p999_us", "max_us")},
                "errors": {k: stats[k] for k in ("connect", "read", "write", "status", "timeout") if stats[k]},
            })
    if "requests" not in out:
        out["error"] = "wrk printed no statistics: " + " | ".join(stdout.strip().splitlines()[-3:])
    elif out.get("first_status") != 200:
        out["error"] = f"first request answered {out.get('first_status', 'nothing')}"
    return out


class Bench:
    """Upstream, nginx and a private OUTLOOP_HOME, kept for the whole run so every cell sees the same ones."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.targets: list[Target] = []
        self.upstream_label = ""
        self.notes: list[str] = []
        self.servers: list[Nginx] = []
        self.helpers: list[Child] = []
        self.loop_dir = tmp / "loop"  # the loop's working directory; never the one holding OUTLOOP_HOME
        self.loop_dir.mkdir()
        self.lua = self.loop_dir / "done.lua"
        self.lua.write_text(DONE_LUA)
        self.home = tmp / "home"
        self.summary = tmp / "summary.json"
        self.network: str | None = None
        try:
            self._start_servers()
        except BaseException:
            self.close()
            raise
        self.env = outloop_env(self.home)

    def _start_servers(self) -> None:
        tmp = self.tmp
        nginx_bin = which("nginx")
        if nginx_bin is None:
            self.notes.append("nginx: SKIPPED - not installed (Debian: apt-get install nginx-light); no nginx "
                              "reference, and the upstream is bench/upstream.py")
            upstream = Child("upstream", [PYTHON, str(BENCH_DIR / "upstream.py")])
            self.helpers.append(upstream)
            up_port = int(upstream.read(20)["port"])
            self.upstream_label = "bench/upstream.py (raw asyncio)"
        else:
            up = Nginx(nginx_bin, tmp / "nginx-upstream", canned_upstream_config())
            self.servers.append(up)
            up_port = up.port
            self.upstream_label = f"nginx {up.release} `return 200` (1 worker)"
        self.targets = [Target("direct", "direct to upstream (client holds the key)", f"http://127.0.0.1:{up_port}",
                               shlex.quote(SECRET), False)]
        if nginx_bin is not None:
            proxy = Nginx(nginx_bin, tmp / "nginx-proxy", proxy_config(up_port))
            self.servers.append(proxy)
            self.targets.append(Target("nginx", f"nginx reverse proxy ({proxy.release}, 1 worker, injects the "
                                       "header)", f"http://127.0.0.1:{proxy.port}", "replaced-by-nginx", False))
        write_bench_profile(self.home / "profiles", f"http://127.0.0.1:{up_port}",
                            child_env={"UP_URL": "{url}", "UP_TOKEN": "{token}"})
        self.targets.append(Target("outloop", "outloop run, base-URL mode, default sandbox", '"$UP_URL"',
                                   '"$UP_TOKEN"', True))

    def argv(self, target: Target, script: str) -> list[str]:
        if not target.wrapped:
            return ["sh", "-c", script]
        return [OUTLOOP, "run", "-w", WORKSPACE, "--quiet", "--summary-json", str(self.summary), "--",
                "sh", "-c", script]

    def cell(self, target: Target, connections: int, seconds: float) -> dict[str, Any]:
        """One fresh process tree; the CPU used meanwhile by processes outside the bench is reported with it."""
        mine = [s.pid for s in self.servers] + [h.pid for h in self.helpers]
        own0 = _own_cpu()
        busy0, servers0, t0 = system_busy_seconds(), process_cpu_seconds(mine), time.monotonic()
        self.summary.unlink(missing_ok=True)
        try:
            done = subprocess.run(self.argv(target, loop_script(target, connections, seconds, self.lua)),
                                  cwd=self.loop_dir, env=self.env, capture_output=True, text=True,
                                  timeout=seconds + 180, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"no result {seconds + 180:.0f} s after the start of a {seconds:g} s cell"}
        elapsed = time.monotonic() - t0
        ours = (_own_cpu() - own0) + (process_cpu_seconds(mine) - servers0)
        result = parse(done.stdout)
        result["other_cpu_pct"] = max(0.0, (system_busy_seconds() - busy0 - ours) / elapsed * 100)
        if done.returncode != 0 and "error" not in result:
            result["error"] = f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
        elif "error" in result and done.stderr.strip():
            result["error"] += f" (stderr: {done.stderr.strip()[-300:]})"
        if target.wrapped and self.summary.exists():
            summary = json.loads(self.summary.read_text())
            self.network = summary.get("sandbox", {}).get("network")
            result["outloop_allowed"] = summary.get("requests", {}).get("allowed")
        return result

    def close(self) -> None:
        for helper in self.helpers:
            helper.stop(timeout=5)
        for server in self.servers:
            server.stop()


def _own_cpu() -> float:
    """CPU of this process plus every descendant it has reaped (the run's whole tree, wrk included)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def missing_tools() -> list[str]:
    wanted = {"wrk": "apt-get install wrk", "curl": "apt-get install curl"}
    return [f"{tool} is not installed ({fix})" for tool, fix in wanted.items() if which(tool) is None]


def run(rounds: int = 3, duration: float = 5.0, long: float = 30.0, log: Log = _stderr) -> dict[str, Any]:
    missing = missing_tools()
    if missing:
        for line in missing:
            log(f"SKIP wrk bench: {line}")
        return {"skipped": "; ".join(missing)}
    tmp = short_tmpdir("olw-")
    try:
        bench = Bench(tmp)
        try:
            return measure_all(bench, rounds, duration, long, log)
        finally:
            bench.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_all(bench: Bench, rounds: int, duration: float, long: float, log: Log) -> dict[str, Any]:
    # One untimed cell per target first: it proves the target answers 200 through the whole chain, and it fills
    # the bytecode cache and the page cache, so no timed first request pays for a compiler or a cold disk.
    targets = []
    for target in bench.targets:
        probe = bench.cell(target, 1, 1)
        if "error" not in probe and probe["errors"]:
            probe["error"] = f"wrk counted errors {probe['errors']}"
        if "error" in probe:
            bench.notes.append(f"{target.label}: left out, its trial run failed: {probe['error']}")
            log(f"SKIP {target.key}: {probe['error']}")
        else:
            targets.append(target)
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {(t.key, c): [] for t in targets for c in CONCURRENCY}
    firsts: dict[str, list[float]] = {t.key: [] for t in targets}
    total = rounds * len(CONCURRENCY) * len(targets) + len(targets)
    done = 0

    def measure(target: Target, connections: int, seconds: float) -> dict[str, Any] | None:
        nonlocal done
        done += 1
        result = bench.cell(target, connections, seconds)
        if "first_ms" in result:
            firsts[target.key].append(result["first_ms"])
        if "error" in result:
            bench.notes.append(f"{target.key}, {connections} connection(s): {result['error']}")
            log(f"  [{done}/{total}] {target.key} c={connections}: ERROR {result['error']}")
            return None
        log(f"  [{done}/{total}] {target.key:<8} c={connections:<2} {result['rps']:>9,.0f} req/s  "
            f"p50 {result['p50_ms']:.3f}  p99 {result['p99_ms']:.3f}  max {result['max_ms']:.1f} ms  "
            f"first {result['first_ms']:.1f} ms  (others used {result['other_cpu_pct']:.0f}% CPU)")
        return result

    for round_no in range(rounds):
        for conc in CONCURRENCY:
            shift = (round_no + conc) % len(targets)
            for target in targets[shift:] + targets[:shift]:  # rotate so no target is always first
                result = measure(target, conc, duration)
                if result is not None:
                    cells[(target.key, conc)].append(result)
    long_runs: dict[str, dict[str, Any]] = {}
    for target in targets[::-1]:  # outloop first, while the machine is as it was for the rounds
        result = measure(target, 1, long)
        if result is not None:
            result["max_with_first_ms"] = max(result["max_ms"], result["first_ms"])
            long_runs[target.key] = result
    if "outloop" in long_runs:  # every request wrk counted went through the broker, and was audited as allowed
        run_ = long_runs["outloop"]
        bench.notes.append(f"the {long:g} s outloop run: curl and wrk completed {run_['requests'] + 1:,} requests; "
                           f"outloop's summary counted {run_.get('outloop_allowed', '?'):,} allowed (wrk may leave "
                           "one in flight when its clock stops)")
    if bench.network is not None and "broker-only" not in bench.network:
        bench.notes.append(f"outloop's network was NOT isolated in these runs: {bench.network}")
    return {"targets": [t.__dict__ for t in targets], "summary": summarise(targets, cells),
            "long": long_runs, "firsts": firsts, "notes": bench.notes, "rounds": rounds, "duration": duration,
            "long_seconds": long, "network": bench.network, "upstream": bench.upstream_label,
            "wrk": _wrk_version()}


def _wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).split("Copyright")[0].strip()


def summarise(targets: Sequence[Target], cells: dict[tuple[str, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Medians over rounds (max: the worst round), and each target next to direct and nginx at that count."""
    def med(runs: list[dict[str, Any]], key: str) -> float:
        return median([float(r[key]) for r in runs])

    rows = []
    for conc in CONCURRENCY:
        direct, nginx = cells.get(("direct", conc), []), cells.get(("nginx", conc), [])
        for t in targets:
            runs = cells[(t.key, conc)]
            if not runs:
                continue
            row = {"key": t.key, "label": t.label, "connections": conc, "rps": med(runs, "rps"),
                   "p50_ms": med(runs, "p50_ms"), "p99_ms": med(runs, "p99_ms"),
                   "max_ms": max(r["max_ms"] for r in runs), "rounds": len(runs),
                   "errors": sum(sum(r["errors"].values()) for r in runs),
                   "other_cpu_pct": med(runs, "other_cpu_pct")}
            row["vs_nginx"] = row["rps"] / med(nginx, "rps") if nginx else float("nan")
            row["vs_direct"] = row["rps"] / med(direct, "rps") if direct else float("nan")
            for key in ("p50_ms", "p99_ms"):
                row[f"added_{key}"] = row[key] - med(direct, key) if direct else float("nan")
            row["added_max_ms"] = row["max_ms"] - max(r["max_ms"] for r in direct) if direct else float("nan")
            rows.append(row)
    return rows


def _row(result: dict[str, Any], key: str, connections: int) -> dict[str, Any] | None:
    return next((r for r in result.get("summary", []) if r["key"] == key and r["connections"] == connections), None)


def targets(result: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(target, goal, measured, verdict) for the wrk run's goals; "n/a" where it could not measure."""
    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**MISSED**")

    result = result or {}
    why = "not measured (see the wrk section)"
    one, eight = _row(result, "outloop", 1), _row(result, "outloop", 8)
    out: list[tuple[str, str, str, str]] = []
    ratio = eight["vs_nginx"] if eight else float("nan")
    out.append(("wrk: throughput vs nginx, 8 connections", f">= {GOALS['vs_nginx_8']:.0%}",
                _pct(ratio) if ratio == ratio else ("nginx skipped" if eight else why),
                verdict(ratio >= GOALS["vs_nginx_8"]) if ratio == ratio else "n/a"))
    for key, name in (("added_p50_ms", "added p50"), ("added_p99_ms", "added p99")):
        value = one[key] if one else float("nan")
        out.append((f"wrk: {name}, 1 connection, after one warm-up request", f"<= {GOALS[key]:g} ms",
                    f"{fmt(value, 3)} ms" if value == value else why,
                    verdict(value <= GOALS[key]) if value == value else "n/a"))
    long = result.get("long", {}).get("outloop")
    out.append((f"wrk: max latency, {result.get('long_seconds', 30):g} s at 1 connection, first request included",
                f"<= {GOALS['max_ms']:g} ms", f"{fmt(long['max_with_first_ms'], 1)} ms" if long else why,
                verdict(long["max_with_first_ms"] <= GOALS["max_ms"]) if long else "n/a"))
    firsts = result.get("firsts", {}).get("outloop", [])
    out.append((f"first request of a fresh run, connect to answer (worst of {len(firsts)} runs)",
                f"<= {GOALS['first_ms']:g} ms", f"{fmt(max(firsts), 1)} ms (median {fmt(median(firsts), 1)})"
                if firsts else why, verdict(max(firsts) <= GOALS["first_ms"]) if firsts else "n/a"))
    return out


def _pct(ratio: float) -> str:
    return "-" if ratio != ratio else f"{ratio * 100:.1f}%"


def render(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"Not measured: {result['skipped']}."
    lines = [
        f"`{result['wrk']}` is the load generator and, for outloop, the loop itself (`outloop run -w bench -- sh -c "
        "'curl ...; exec wrk ...'`, base-URL mode through `$UP_URL`/`$UP_TOKEN`, network: "
        f"{result['network'] or 'unknown'}). Upstream for all three targets: {result['upstream']}. Medians of "
        f"{result['rounds']} interleaved rounds x {result['duration']:g} s per cell, each cell a fresh process tree "
        "whose first request (timed by curl) is the warm-up; max is the worst round. \"added\" is the difference "
        "from direct at the same connection count. wrk corrects latencies for coordinated omission, so one stall "
        "raises p99 (see bench/README.md). \"other load\" is CPU used by processes outside the bench during the "
        "cell (% of one core).",
        "",
        "| target | conns | req/s | vs nginx | vs direct | p50 ms | p99 ms | max ms | added p50 | added p99 "
        "| added max | errors | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        ref = row["key"] == "direct"
        lines.append(
            f"| {row['label']} | {row['connections']} | {fmt(row['rps'], 0)} | "
            f"{'-' if row['key'] == 'nginx' or ref else _pct(row['vs_nginx'])} | "
            f"{'-' if ref else _pct(row['vs_direct'])} | {fmt(row['p50_ms'], 3)} | "
            f"{fmt(row['p99_ms'], 3)} | {fmt(row['max_ms'], 2)} | "
            + " | ".join("-" if ref else fmt(row[k], 3) for k in ("added_p50_ms", "added_p99_ms", "added_max_ms"))
            + f" | {row['errors']} | {fmt(row['other_cpu_pct'], 0)}% |")
    if result["long"]:
        lines += ["", f"One fresh run per target, {result['long_seconds']:g} s at 1 connection; the max includes "
                  "the run's first request (connect to answer).", "",
                  "| target | requests | req/s | p99 ms | max ms, first included | first request ms | other load |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, run_ in result["long"].items():
            label = next(t["label"] for t in result["targets"] if t["key"] == key)
            lines.append(f"| {label} | {run_['requests']:,} | {fmt(run_['rps'], 0)} | {fmt(run_['p99_ms'], 3)} | "
                         f"{fmt(run_['max_with_first_ms'], 2)} | {fmt(run_['first_ms'], 2)} | "
                         f"{fmt(run_['other_cpu_pct'], 0)}% |")
    lines += ["", "First request of each cell (curl, connect to answer; for outloop a fresh run's first broker "
              "request):", "", "| target | runs | median ms | worst ms |", "|---|---:|---:|---:|"]
    for target in result["targets"]:
        values = result["firsts"].get(target["key"], [])
        lines.append(f"| {target['label']} | {len(values)} | {fmt(median(values), 2)} | "
                     f"{fmt(max(values) if values else float('nan'), 2)} |")
    if result["notes"]:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per cell")
    parser.add_argument("--long", type=float, default=30.0, help="seconds of the 1-connection max-latency run")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s cells and a 5 s long run (smoke test)")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.long = 1, 2.0, 5.0
    result = run(rounds=args.rounds, duration=args.duration, long=args.long)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(render(result))
    for name, goal, value, verdict in targets(result):
        print(f"{verdict:>10}  {name}: {value} (goal {goal})")


if __name__ == "__main__":
    main()
