"""`make bench`: run every bench, print the results and write them to docs/BENCHMARKS.md.

`wrk` is the load generator of record (bench/wrk_loop.py: wrk as the loop under `outloop run`, next to nginx and
direct); bench/loadgen.py (bench/broker.py) is the second opinion. It reports and never fails the build: a slow
machine, a missing wrk or nginx or a crashed section becomes a line in the report, and the exit status is 0.
About 7 minutes on 2 cores (`--quick`: about one); all traffic stays on 127.0.0.1 and Unix sockets.

    .venv/bin/python bench/run_all.py [--quick] [--profile] [--experiments] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import broker as broker_bench
import guard as guard_bench
import proxy as proxy_bench
import startup as startup_bench
import wrk_loop as wrk_bench
from common import REPO, fmt, machine, wait_for_quiet

DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- bench/run_all.py writes from here to the END marker; edit outside it -->"
END = "<!-- END of generated results -->"
ANALYSIS_STUB = """
## Analysis

(Hand-written notes go here; `make bench` rewrites only the generated block above.)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def section(name: str, work: Callable[[], Any], failures: list[str]) -> Any:
    log(f"== {name}")
    started = time.monotonic()
    try:
        return work()
    except Exception as exc:  # a bench that breaks is reported, never fatal
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
        return None
    finally:
        log(f"== {name}: {time.monotonic() - started:.0f} s")


def _row(rows: list[dict[str, Any]], key: str, clients: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["key"] == key and r["clients"] == clients), None)


def targets(wrk: dict[str, Any] | None, broker: dict[str, Any] | None,
            startup: dict[str, Any] | None, proxy: dict[str, Any] | None = None) -> list[tuple[str, str, str, str]]:
    """(target, goal, measured, verdict): wrk's first, then the second opinion's, the stream's, start-up's and
    the egress proxy's."""
    out = wrk_bench.targets(wrk)

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**MISSED**")

    rows = broker["summary"] if broker else []
    for key, where in (("outloop-unix", "Unix socket"), ("outloop-tcp", "base-URL TCP")):
        one, eight = _row(rows, key, 1), _row(rows, key, 8)
        name = f"loadgen ({where})"
        if one:
            out.append((f"{name}: added p50 latency, 1 client", "<= 0.5 ms", f"{fmt(one['added_p50_ms'], 3)} ms",
                        verdict(one["added_p50_ms"] <= 0.5)))
            out.append((f"{name}: added p99 latency, 1 client", "<= 2 ms", f"{fmt(one['added_p99_ms'], 3)} ms",
                        verdict(one["added_p99_ms"] <= 2.0)))
        if eight:
            out.append((f"{name}: throughput, 8 clients, audit on", ">= 5,000 req/s", f"{fmt(eight['rps'], 0)} req/s",
                        verdict(eight["rps"] >= 5000)))
            ratio = eight["vs_nginx"]
            out.append((f"{name}: throughput vs nginx, 8 clients", ">= 25%",
                        f"{fmt(ratio * 100, 1)}%" if ratio == ratio else "nginx skipped",
                        verdict(ratio >= 0.25) if ratio == ratio else "n/a"))
    if broker and broker.get("stream"):
        growth = broker["stream"]["rss_growth_mb"]
        complete = broker["stream"].get("bytes") == broker_bench.STREAM_BYTES
        out.append(("100 MB stream: broker RSS growth", "< 20 MB",
                    f"{fmt(growth, 1)} MB" + ("" if complete else " (stream INCOMPLETE)"),
                    verdict(growth < 20 and complete)))
    srows = {r["label"]: r for r in (startup["rows"] if startup else [])}
    for label in ("`outloop run -- true` (default network: auto)", "`outloop run --network open -- true`"):
        if label in srows:
            value = srows[label]["over_true_ms"]
            out.append((f"{label} over bare `true`", "<= 150 ms", f"{fmt(value, 0)} ms", verdict(value <= 150)))
    if "`outloop --help`" in srows:
        value = srows["`outloop --help`"]["median_ms"]
        out.append(("`outloop --help`", "< 100 ms", f"{fmt(value, 0)} ms", verdict(value < 100)))
    if proxy:
        added = proxy["added_kept_p50"]
        out.append(("egress proxy: added p50, kept-alive intercepted request", "<= 1 ms", f"{fmt(added, 3)} ms",
                    verdict(added <= 1.0)))
        out.append(("egress proxy: added p50, new connection (CONNECT + TLS)", "reported",
                    f"{fmt(proxy['added_new_p50'], 3)} ms", "n/a"))
    return out


def render(info: dict[str, str], wrk: dict[str, Any] | None, broker: dict[str, Any] | None,
           startup: dict[str, Any] | None,
           guard: dict[str, Any] | None, profile: str | None, experiments: dict[str, Any] | None,
           failures: list[str], seconds: float, proxy: dict[str, Any] | None = None) -> str:
    lines = [
        "## Machine",
        "",
        *[f"- **{key}**: {value}" for key, value in info.items()],
        "",
        f"Regenerate with `make bench` ({seconds:.0f} s this time). Numbers on a shared or busy machine move by "
        "tens of percent between runs; compare ratios measured in the same run, not absolute figures across "
        "machines.",
        "",
        "## Targets",
        "",
        "\"wrk\" rows are measured with wrk as the loop; \"loadgen\" rows are the second opinion from the "
        "project's own load generator, in the same run.",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---:|---|",
        *[f"| {name} | {goal} | {value} | {ok} |" for name, goal, value, ok in targets(wrk, broker, startup, proxy)],
        "",
        "## Broker under wrk: the loop is `wrk` under `outloop run`",
        "",
        wrk_bench.render(wrk) if wrk else "Not measured (see failures below).",
        "",
        "## Broker, second opinion: bench/loadgen.py against a broker host process",
        "",
        broker_bench.render(broker) if broker else "Not measured (see failures below).",
        "",
        "## Start-up",
        "",
        startup_bench.render(startup) if startup else "Not measured (see failures below).",
        "",
        "## Egress proxy",
        "",
        proxy_bench.render(proxy) if proxy else "Not measured (see failures below).",
        "",
        "## Wrong-client guard",
        "",
        guard_bench.render(guard) if guard else "Not measured (see failures below).",
    ]
    if experiments:
        lines += ["", "## What-if experiments (bench-only monkeypatches, not product options)", "",
                  broker_bench.render(experiments)]
    if profile:
        lines += ["", "## Profile", "", profile]
    if failures:
        lines += ["", "## Sections that failed", "", *[f"- {failure}" for failure in failures]]
    return "\n".join(lines)


def write_doc(generated: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    block = f"{BEGIN}\n\n{generated}\n\n{END}"
    if DOC.exists() and BEGIN in (text := DOC.read_text()) and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOC.write_text(head + block + tail)
    else:
        DOC.write_text("# Benchmarks\n\nHow fast the broker and the CLI are, next to references measured in the "
                       "same run. Method and scripts: `bench/README.md`.\n\n" + block + "\n" + ANALYSIS_STUB)


README = REPO / "README.md"
README_BEGIN = "<!-- bench:start (make bench rewrites this block) -->"
README_END = "<!-- bench:end -->"


def readme_block(info: dict[str, str], wrk: dict[str, Any] | None, broker: dict[str, Any] | None,
                 startup: dict[str, Any] | None, proxy: dict[str, Any] | None = None) -> str:
    """The README's short version: where and when, the targets, and what each sandbox layer costs at start-up."""
    busy = info.get("other processes' CPU at start", "")
    lines = [f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores), commit {info['commit']}; "
             "medians of interleaved rounds, references measured in the same run"
             + (f"; other processes' CPU at start: {busy}" if "BUSY" in busy else "")
             + ". Full tables: [docs/BENCHMARKS.md](docs/BENCHMARKS.md).", "",
             "| target | goal | measured | verdict |", "|---|---|---:|---|",
             *[f"| {name} | {goal} | {value} | {ok} |"
               for name, goal, value, ok in targets(wrk, broker, startup, proxy)]]
    rows = [r for r in (wrk or {}).get("summary", []) if r["connections"] == 8]
    if rows:
        lines += ["", "| wrk, 8 connections | req/s | vs nginx | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
        for row in rows:
            label = row["label"]
            ratio = row.get("vs_nginx")
            shown = f"{ratio * 100:.0f}%" if isinstance(ratio, float) and ratio == ratio else "-"
            lines.append(f"| {label} | {fmt(row['rps'], 0)} | {shown} | {fmt(row['p50_ms'], 3)} | "
                         f"{fmt(row['p99_ms'], 3)} |")
    if startup:
        lines += ["", "| start-up (sandbox layers) | median ms | over bare `true` |", "|---|---:|---:|"]
        lines += [f"| {r['label']} | {fmt(r['median_ms'], 0)} | {fmt(r['over_true_ms'], 0)} |"
                  for r in startup["rows"] if r["label"].startswith(("`outloop run", "bare"))]
    return "\n".join(lines)


def write_readme(block: str) -> None:
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    README.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 short round, fewer start-up runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per loadgen cell")
    parser.add_argument("--wrk-duration", type=float, default=5.0, help="seconds of wrk per cell")
    parser.add_argument("--long", type=float, default=30.0, help="seconds of the 1-connection max-latency run")
    parser.add_argument("--runs", type=int, default=11, help="start-up runs per command")
    parser.add_argument("--profile", action="store_true", help="also profile the broker with py-spy")
    parser.add_argument("--experiments", action="store_true", help="also run the what-if brokers")
    parser.add_argument("--wait-quiet", type=float, default=60,
                        help="wait up to this many seconds for other processes to go quiet first")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {DOC.relative_to(REPO)} alone")
    args = parser.parse_args()
    started = time.monotonic()
    failures: list[str] = []
    info = machine()
    if args.wait_quiet > 0:
        share = wait_for_quiet(args.wait_quiet, log=log)
        info["other processes' CPU at start"] = f"{share:.0%} of one core" + (
            " (BUSY: expect noisy numbers)" if share >= 0.3 else "")
    info["load average before (1/5/15 min)"] = load_average()
    if args.quick:
        args.rounds, args.duration, args.runs, args.wrk_duration, args.long = 1, 1.0, 4, 2.0, 5.0
    wrk = section("wrk", lambda: wrk_bench.run(rounds=args.rounds, duration=args.wrk_duration, long=args.long,
                                               log=log), failures)
    broker = section("broker", lambda: broker_bench.run(rounds=args.rounds, duration=args.duration, log=log),
                     failures)
    startup = section("startup", lambda: startup_bench.run(runs=args.runs, log=log), failures)
    proxy = section("proxy", lambda: proxy_bench.run(requests=500 if args.quick else 2000,
                                                     connections=50 if args.quick else 200,
                                                     rounds=1 if args.quick else args.rounds, log=log), failures)
    guard = section("guard", lambda: guard_bench.run(rounds=1 if args.quick else 5, log=log), failures)
    experiments = None
    if args.experiments:
        experiments = section("experiments", lambda: broker_bench.run(
            rounds=args.rounds, duration=args.duration, stream=False, variants=False, experiments=True,
            concurrency=(1, 8), log=log), failures)
    profile = None
    if args.profile:
        def do_profile() -> str:
            import profile_broker

            parts = []
            for audit in ("real", "noop"):
                result = profile_broker.run_profile(8, 8, audit, "asyncio", False, "unix", 250)
                parts.append(profile_broker.render(result, f"8 clients, audit {'on' if audit == 'real' else 'OFF'}"
                                                   ", asyncio, Unix socket"))
            return "\n\n".join(parts)

        profile = section("profile", do_profile, failures)
    info["load average after (1/5/15 min)"] = load_average()
    text = render(info, wrk, broker, startup, guard, profile, experiments, failures, time.monotonic() - started,
                  proxy)
    if not args.no_write:
        try:
            write_doc(text)
            write_readme(readme_block(info, wrk, broker, startup, proxy))
            log(f"wrote {DOC} and the README's results block")
        except OSError as exc:
            log(f"could not write the results: {exc}")
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:  # never fail the build: report and exit 0
        traceback.print_exc()
        sys.exit(0)
