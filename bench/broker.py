"""Broker throughput and latency next to direct and nginx, interleaved in one run; plus a 100 MB stream.

Every process is separate (upstream, load generator, nginx, each broker), so nothing shares a GIL. All
traffic stays on 127.0.0.1 and Unix sockets. It reports; it never asserts.

    .venv/bin/python bench/broker.py [--rounds 3] [--duration 1.5] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BENCH_DIR,
    CREDENTIAL,
    PYTHON,
    SECRET,
    SECRET_ENV,
    fmt,
    median,
    process_cpu_seconds,
    short_tmpdir,
    system_busy_seconds,
    which,
    write_bench_profile,
)
from nginx import Nginx, proxy_config

CONCURRENCY = (1, 8, 32)
UPSTREAM_PATH = "/v1/contacts/51?properties=email,firstname"
STREAM_BYTES = 100 * 1024 * 1024
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Child processes


class Child:
    """A helper process spoken to by JSON lines; EOF on its stdin asks it to stop."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=BENCH_DIR.parent)
        self._err: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)
            del self._err[:-50]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self) -> str:
        return "".join(self._err[-10:]).strip()

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(f"{self.name}: no answer in {timeout:.0f} s; stderr: {self.stderr_tail()}")
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.proc.poll()}); stderr: {self.stderr_tail()}")
            if line.startswith("{"):
                answer: dict[str, Any] = json.loads(line)
                return answer
            if time.monotonic() > deadline:  # only chatter (a profiler's banner, say) and no answer
                raise RuntimeError(f"{self.name}: no answer in {timeout:.0f} s")

    def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self, timeout: float = 10) -> dict[str, Any] | None:
        """Close stdin and wait; the last JSON line it printed (if any) is returned."""
        last = None
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)  # helpers print at most a line or two at exit: no pipe deadlock
            out = self.proc.stdout.read() if self.proc.stdout is not None else ""
            for line in (out or "").splitlines():
                if line.startswith("{"):
                    last = json.loads(line)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            self.proc.kill()
            self.proc.wait()
        return last


# --------------------------------------------------------------------------------------------------
# What is measured


@dataclass
class Target:
    key: str
    label: str
    address: dict[str, Any]
    request: str
    watch: int | None  # the proxy process whose CPU and RSS are reported
    kind: str  # direct | nginx | broker


@dataclass
class Cell:
    runs: list[dict[str, Any]] = field(default_factory=list)

    def med(self, key: str) -> float:
        return median([float(r[key]) for r in self.runs if r.get(key) is not None])

    @property
    def errors(self) -> int:
        return int(sum(r["requests"] - r["ok"] for r in self.runs) + sum(sum(r["errors"].values()) for r in self.runs))

    @property
    def rss_mb(self) -> float:
        values = [r["proxy_rss"] for r in self.runs if r.get("proxy_rss")]
        return max(values) / 2**20 if values else float("nan")


def http_request(path: str, host: str, extra: Sequence[str] = ()) -> str:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: outloop-bench/1", "Accept: application/json",
             *extra]
    return "\r\n".join(lines) + "\r\n\r\n"


# name, label, audit, event loop, also measure base-URL TCP, bench-only tweaks (see broker_host.TWEAKS)
Config = tuple[str, str, str, str, bool, tuple[str, ...]]
# The run path uses uvloop where it is installed (a dependency on Linux), else asyncio.
SHIPPED_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
SHIPPED: Config = ("outloop", f"outloop as shipped (audit on, {SHIPPED_LOOP})", "real", SHIPPED_LOOP, True, ())
VARIANTS: list[Config] = [
    ("noaudit-uvloop", "outloop (audit OFF, uvloop)", "noop", "uvloop", False, ()),
    ("asyncio", "outloop (audit on, asyncio)", "real", "asyncio", False, ()),
    ("noaudit", "outloop (audit OFF, asyncio)", "noop", "asyncio", False, ()),
]
ALL_TWEAKS = ("fewer-indexes", "switch-interval")
EXPERIMENTS: list[Config] = [
    ("x-floor-server", "reference: the broker's server alone (canned 200)", "noop", "asyncio", False,
     ("floor-server",)),
    ("x-floor-proxy", "reference: the broker's server + upstream pool, no outloop logic", "noop", "asyncio", False,
     ("floor-proxy",)),
    ("noaudit", "outloop (audit OFF, asyncio)", "noop", "asyncio", False, ()),
    ("x-fewidx", "what-if: fewer event indexes", "real", "asyncio", False, ("fewer-indexes",)),
    ("x-switch", "what-if: GIL switch interval 0.5 ms", "real", "asyncio", False, ("switch-interval",)),
    ("x-all", "what-if: both", "real", "asyncio", False, ALL_TWEAKS),
    ("x-all-uvloop", "what-if: both + uvloop", "real", "uvloop", False, ALL_TWEAKS),
]


def start_broker(name: str, tmp: Path, upstream_port: int, child_pid: int, audit: str, loop: str,
                 tweaks: Sequence[str] = ()) -> Child:
    home = tmp / name
    write_bench_profile(home / "profiles", f"http://127.0.0.1:{upstream_port}")
    env = {**os.environ, SECRET_ENV: SECRET, "OUTLOOP_HOME": str(home)}
    child = Child(f"broker[{name}]", [PYTHON, str(BENCH_DIR / "broker_host.py"), "--home", str(home),
                                      "--child-pid", str(child_pid), "--audit", audit, "--loop", loop,
                                      *[arg for tweak in tweaks for arg in ("--tweak", tweak)]], env=env)
    child.ready = child.read(30)  # type: ignore[attr-defined]
    return child


def broker_targets(name: str, label: str, host: Child, with_tcp: bool) -> list[Target]:
    ready = host.ready  # type: ignore[attr-defined]
    path = f"/v1/http/{CREDENTIAL}{UPSTREAM_PATH}"
    targets = [Target(f"{name}-unix", f"{label}, Unix socket", {"unix": ready["socket"]},
                      http_request(path, "localhost"), host.pid, "broker")]
    if with_tcp:
        targets.append(Target(f"{name}-tcp", f"{label}, base-URL TCP", {"host": "127.0.0.1", "port": ready["port"]},
                              http_request(path, f"127.0.0.1:{ready['port']}",
                                           [f"Authorization: Bearer {ready['token']}"]),
                              host.pid, "broker"))
    return targets


def peer_check_refuses_outsiders(socket_path: str) -> bool:
    """This process is not the run's child: the broker must answer it 401."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        sock.sendall(http_request(f"/v1/http/{CREDENTIAL}{UPSTREAM_PATH}", "localhost").encode())
        return sock.recv(64).startswith(b"HTTP/1.1 401")


def run(rounds: int = 3, duration: float = 1.5, warmup: float = 0.3, concurrency: Sequence[int] = CONCURRENCY,
        stream: bool = True, variants: bool = True, experiments: bool = False,
        log: Log = _stderr) -> dict[str, Any]:
    tmp = short_tmpdir("olb-")
    children: list[Child] = []
    nginx: Nginx | None = None
    notes: list[str] = []
    try:
        upstream = Child("upstream", [PYTHON, str(BENCH_DIR / "upstream.py")])
        children.append(upstream)
        up_port = upstream.read(20)["port"]
        loadgen = Child("loadgen", [PYTHON, str(BENCH_DIR / "loadgen.py")])
        children.append(loadgen)

        targets = [Target("direct", "direct to upstream (client holds the key)", {"host": "127.0.0.1", "port": up_port},
                          http_request(UPSTREAM_PATH, f"127.0.0.1:{up_port}", [f"Authorization: Bearer {SECRET}"]),
                          None, "direct")]
        nginx_bin = which("nginx")
        if nginx_bin is None:
            notes.append("nginx: SKIPPED - not installed (Debian: apt-get install nginx-light); "
                         "the nginx ratio cannot be reported")
            log("SKIP nginx: not installed (apt-get install nginx-light)")
        else:
            try:
                nginx = Nginx(nginx_bin, tmp / "nginx", proxy_config(up_port))
                targets.append(Target("nginx", f"nginx reverse proxy ({nginx.release}, 1 worker, "
                                      "upstream keepalive)", {"host": "127.0.0.1", "port": nginx.port},
                                      http_request(UPSTREAM_PATH, f"127.0.0.1:{nginx.port}"), nginx.pid, "nginx"))
            except (RuntimeError, OSError) as exc:
                notes.append(f"nginx: SKIPPED - {exc}")
                log(f"SKIP nginx: {exc}")

        configs = [SHIPPED] + (VARIANTS if variants else []) + (EXPERIMENTS if experiments else [])
        if experiments:
            for loop, audit in (("asyncio", "none"), ("asyncio", "runlog"), ("asyncio", "journal"),
                                ("uvloop", "none"), ("uvloop", "runlog"), ("uvloop", "journal")):
                name = f"raw-{loop}-{audit}"
                (tmp / name).mkdir()
                raw = Child(name, [PYTHON, str(BENCH_DIR / "rawproxy.py"), "--upstream-port", str(up_port),
                                   "--dir", str(tmp / name), "--loop", loop, "--audit", audit])
                children.append(raw)
                ready = raw.read(30)
                what = {"none": "no audit", "runlog": "RunLog audit", "journal": "journal-file audit (prototype)"}
                targets.append(Target(name, f"reference: raw asyncio proxy, {loop}, {what[audit]}",
                                      {"unix": ready["socket"]},
                                      http_request(f"/v1/http/{CREDENTIAL}{UPSTREAM_PATH}", "localhost"),
                                      raw.pid, "reference"))
        hosts: dict[str, Child] = {}
        for name, label, audit, loop, with_tcp, tweaks in configs:
            try:
                host = start_broker(name, tmp, up_port, loadgen.pid, audit, loop, tweaks)
            except (RuntimeError, ImportError) as exc:
                notes.append(f"{label}: SKIPPED - {exc}")
                log(f"SKIP {label}: {exc}")
                continue
            children.append(host)
            hosts[name] = host
            targets += broker_targets(name, label, host, with_tcp)

        # Sanity before timing: every target answers 200 (so injection works), outsiders get 401.
        for target in list(targets):
            answer = loadgen.ask({"cmd": "probe", "target": target.address, "request": target.request}, 20)
            if answer.get("status") != 200:
                notes.append(f"{target.label}: probe answered {answer}; left out")
                log(f"WARNING {target.label}: probe answered {answer}; left out")
                targets.remove(target)
        if "outloop" in hosts:
            refused = peer_check_refuses_outsiders(hosts["outloop"].ready["socket"])  # type: ignore[attr-defined]
            notes.append("peer check: a process outside the run is refused with 401" if refused
                         else "BUG? peer check let a process outside the run through")

        if not targets:
            raise RuntimeError("nothing to measure: every target failed its probe")
        cells: dict[tuple[str, int], Cell] = {(t.key, c): Cell() for t in targets for c in concurrency}
        total = rounds * len(concurrency) * len(targets)
        done = 0
        for round_no in range(rounds):
            for conc in concurrency:
                shift = (round_no + conc) % len(targets)
                for target in targets[shift:] + targets[:shift]:  # rotate so no target is always first
                    mine = [child.pid for child in children] + ([nginx.pid] if nginx else [])
                    busy0, mine0, t0 = system_busy_seconds(), process_cpu_seconds(mine), time.monotonic()
                    result = loadgen.ask({"cmd": "load", "target": target.address, "request": target.request,
                                          "clients": conc, "duration": duration, "warmup": warmup,
                                          "watch": target.watch}, duration + warmup + 60)
                    elapsed = time.monotonic() - t0
                    # CPU the rest of the machine used meanwhile: a shared box shows up here, not as noise.
                    result["other_cpu_pct"] = max(0.0, (system_busy_seconds() - busy0
                                                        - (process_cpu_seconds(mine) - mine0)) / elapsed * 100)
                    done += 1
                    if "error" in result:
                        log(f"  [{done}/{total}] {target.key} c={conc}: ERROR {result['error']}")
                        continue
                    cells[(target.key, conc)].runs.append(result)
                    log(f"  [{done}/{total}] {target.key:<24} c={conc:<3} {result['rps']:>9,.0f} req/s  "
                        f"p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  "
                        f"(others used {result['other_cpu_pct']:.0f}% CPU)")

        streaming = run_stream(tmp, up_port, loadgen, log) if stream else None
        audit_events = {}
        for name, host in hosts.items():
            final = host.stop()
            children.remove(host)
            if final and final.get("commits"):
                audit_events[name] = (f"{final['audit_events']:,} events in {final['commits']:,} commits "
                                      f"({final['events'] / final['commits']:.1f} events per commit)")
        return {"targets": [t.__dict__ for t in targets], "cells": {f"{k}|{c}": cell.runs for (k, c), cell in
                                                                    cells.items()},
                "summary": summarise(targets, cells, concurrency), "stream": streaming, "notes": notes,
                "audit_events": audit_events, "rounds": rounds, "duration": duration,
                "concurrency": list(concurrency)}
    finally:
        for child in reversed(children):
            child.stop(timeout=5)
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def run_stream(tmp: Path, up_port: int, loadgen: Child, log: Log) -> dict[str, Any]:
    """A 100 MB body through a fresh broker, RSS sampled every 10 ms; direct for the speed reference."""
    import psutil

    host = start_broker("stream", tmp, up_port, loadgen.pid, "real", "asyncio")
    try:
        ready = host.ready  # type: ignore[attr-defined]
        target = {"unix": ready["socket"]}
        warm = loadgen.ask({"cmd": "stream", "target": target, "request": http_request(
            f"/v1/http/{CREDENTIAL}/big?bytes=1048576", "localhost")}, 60)
        proc = psutil.Process(host.pid)
        time.sleep(0.2)
        before = proc.memory_info().rss
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = sum(proc.cpu_times()[:2])
        through = loadgen.ask({"cmd": "stream", "target": target, "request": http_request(
            f"/v1/http/{CREDENTIAL}/big?bytes={STREAM_BYTES}", "localhost")}, 180)
        cpu1 = sum(proc.cpu_times()[:2])
        stop.set()
        sampler.join()
        after = proc.memory_info().rss
        direct = loadgen.ask({"cmd": "stream", "target": {"host": "127.0.0.1", "port": up_port}, "request":
                              http_request(f"/big?bytes={STREAM_BYTES}", f"127.0.0.1:{up_port}",
                                           [f"Authorization: Bearer {SECRET}"])}, 180)
        result = {
            "bytes": through.get("bytes"), "status": through.get("status"), "error": through.get("error"),
            "warm_status": warm.get("status"),
            "rss_before_mb": before / 2**20, "rss_peak_mb": peak[0] / 2**20, "rss_after_mb": after / 2**20,
            "rss_growth_mb": (peak[0] - before) / 2**20,
            "seconds": through.get("seconds"),
            "mb_per_s": (through["bytes"] / 2**20 / through["seconds"]) if through.get("seconds") else None,
            "direct_mb_per_s": (direct["bytes"] / 2**20 / direct["seconds"]) if direct.get("seconds") else None,
            "broker_cpu_s": cpu1 - cpu0,
        }
        log(f"  stream 100 MB: {result['bytes']} bytes, status {result['status']}, "
            f"RSS growth {result['rss_growth_mb']:.1f} MB, {result['mb_per_s'] or 0:.0f} MB/s "
            f"(direct {result['direct_mb_per_s'] or 0:.0f} MB/s)")
        return result
    finally:
        host.stop()


# --------------------------------------------------------------------------------------------------
# Reporting


def summarise(targets: Sequence[Target], cells: dict[tuple[str, int], Cell],
              concurrency: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for conc in concurrency:
        direct = cells.get(("direct", conc))
        nginx = cells.get(("nginx", conc))
        for t in targets:
            cell = cells[(t.key, conc)]
            if not cell.runs:
                continue
            rps = cell.med("rps")
            row = {
                "key": t.key, "label": t.label, "kind": t.kind, "clients": conc, "rps": rps,
                "p50_ms": cell.med("p50_ms"), "p99_ms": cell.med("p99_ms"),
                "cpu_pct": cell.med("proxy_cpu_pct"), "cpu_us_per_req": cell.med("proxy_cpu_us_per_req"),
                "rss_mb": cell.rss_mb, "errors": cell.errors, "rounds": len(cell.runs),
                "other_cpu_pct": cell.med("other_cpu_pct"),
                "vs_direct": rps / direct.med("rps") if direct and direct.runs else float("nan"),
                "vs_nginx": rps / nginx.med("rps") if nginx and nginx.runs else float("nan"),
                "added_p50_ms": cell.med("p50_ms") - direct.med("p50_ms") if direct and direct.runs else float("nan"),
                "added_p99_ms": cell.med("p99_ms") - direct.med("p99_ms") if direct and direct.runs else float("nan"),
            }
            rows.append(row)
    return rows


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Medians of {result['rounds']} interleaved rounds x {result['duration']:g} s per cell. "
        "Latency is per request as seen by the client (closed loop, keep-alive). "
        "\"added\" is the difference from direct at the same concurrency; CPU and RSS are of the proxy process "
        "(the broker's includes its audit writer thread). The load generator, the upstream and the proxy share "
        "the same cores. \"other load\" is CPU used by processes outside the bench during the cell (% of one "
        "core): when it is high, the row was measured on a busy machine.",
        "",
        "| target | clients | req/s | vs nginx | vs direct | p50 ms | p99 ms | added p50 | added p99 "
        "| proxy CPU | CPU µs/req | proxy RSS MB | errors | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        direct = row["kind"] == "direct"
        lines.append(
            f"| {row['label']} | {row['clients']} | {fmt(row['rps'], 0)} | "
            f"{'-' if direct else fmt(row['vs_nginx'] * 100, 0) + '%'} | "
            f"{'-' if direct else fmt(row['vs_direct'] * 100, 0) + '%'} | "
            f"{fmt(row['p50_ms'], 3)} | {fmt(row['p99_ms'], 3)} | "
            f"{'-' if direct else fmt(row['added_p50_ms'], 3)} | {'-' if direct else fmt(row['added_p99_ms'], 3)} | "
            f"{'-' if direct else fmt(row['cpu_pct'], 0) + '%'} | {'-' if direct else fmt(row['cpu_us_per_req'], 0)} | "
            f"{'-' if direct else fmt(row['rss_mb'], 1)} | {row['errors']} | {fmt(row['other_cpu_pct'], 0)}% |")
    stream = result.get("stream")
    if stream:
        lines += [
            "",
            "| streaming 100 MB through the broker (Unix socket, audit on) | value |",
            "|---|---:|",
            f"| bytes received (status {stream['status']}) | {stream['bytes']:,} |" if stream.get("bytes") else
            f"| bytes received | FAILED: {stream.get('error')} |",
            f"| broker RSS before / peak / after | {fmt(stream['rss_before_mb'], 1)} / {fmt(stream['rss_peak_mb'], 1)}"
            f" / {fmt(stream['rss_after_mb'], 1)} MB |",
            f"| **broker RSS growth** | **{fmt(stream['rss_growth_mb'], 1)} MB** |",
            f"| throughput through broker / direct | {fmt(stream['mb_per_s'] or float('nan'), 0)} / "
            f"{fmt(stream['direct_mb_per_s'] or float('nan'), 0)} MB/s |",
            f"| broker CPU for the stream | {fmt(stream['broker_cpu_s'], 2)} s |",
        ]
    if result.get("audit_events"):
        lines += ["", "Audit log of each broker with audit on, over the whole bench: " + "; ".join(
            f"{k}: {v}" for k, v in result["audit_events"].items()) + "."]
    if result.get("notes"):
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds measured per cell")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s, no variants (smoke test)")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--experiments", action="store_true",
                        help="add the bench-only what-if brokers (see broker_host.TWEAKS); clients 1 and 8 only")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    args = parser.parse_args()
    if args.quick:
        result = run(rounds=1, duration=1.0, variants=False, stream=not args.no_stream)
    elif args.experiments:
        result = run(rounds=args.rounds, duration=args.duration, stream=False, variants=False, experiments=True,
                     concurrency=(1, 8))
    else:
        result = run(rounds=args.rounds, duration=args.duration, stream=not args.no_stream)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(render(result))


if __name__ == "__main__":
    main()
