"""Where the broker's time goes under load: py-spy samples a broker host while 8 clients hammer it.

Not part of `make bench` by default (py-spy is a dev tool: `.venv/bin/pip install py-spy`); run_all.py runs it
with `--profile`. Writes the raw collapsed stacks (and an SVG flame graph) under .bench/ and prints a summary:
samples per thread, inclusive share of the broker's code paths, and the top self-time functions.

    .venv/bin/python bench/profile_broker.py [--seconds 10] [--clients 8] [--audit real|noop]
                                             [--loop asyncio|uvloop] [--native]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker import Child, broker_targets, start_broker
from common import BENCH_DIR, PYTHON, REPO, fmt, short_tmpdir

OUT_DIR = REPO / ".bench"

# (label, regex on one frame "function (file:line)"): inclusive share = stacks containing a matching frame.
PATHS: list[tuple[str, str]] = [
    ("child-side server: read + llhttp parse (data_received)", r"^data_received \(outloop_cli/broker/wire"),
    ("child-side server: the connection's task (_answer_in_turn)", r"^_answer_in_turn \(outloop_cli/broker/wire"),
    ("broker: Broker.handle / _route (all of the handler)", r"^(handle|handle_loopback|_route) \(outloop_cli/"),
    ("broker: peer check (peer_allowed)", r"^_peer_allowed \("),
    ("broker: token check (_token_presented)", r"^_token_presented \("),
    ("broker: policy (normalise_path + decide)", r"^(normalise_path|decide) \(outloop_cli/policy"),
    ("broker: upstream_query", r"^upstream_query \("),
    ("broker: upstream_headers", r"^upstream_headers \("),
    ("broker: child_response_headers + redact_text", r"^(child_response_headers|redact_text) \("),
    ("broker: StreamRedactor (body redaction)", r"^(feed|flush|_mask|_risky_tail|__init__) \(outloop_cli/broker/re"),
    ("audit, event-loop side: _audit_request/record_request_async", r"^(_audit_request|record_request_async) \("),
    ("audit, event-loop side: record_response (queue put)", r"^record_response \("),
    ("audit, event-loop side: _settle_all (future resolution)", r"^_settle_all \("),
    ("audit, writer thread: RunLog._loop (all)", r"^_loop \(outloop_cli/audit/writer"),
    ("audit, writer thread: _commit SQL (execute/executemany)", r"^_commit \(outloop_cli/audit/writer"),
    ("audit, writer thread: _chain (hash + canonical_json)", r"^_chain \(outloop_cli/audit/writer"),
    ("audit, writer thread: _notify (call_soon_threadsafe)", r"^_notify \(outloop_cli/audit/writer"),
    ("upstream pool: request (head out, wait for the answer's head)", r"^request \(outloop_cli/broker/upstream_pool"),
    ("upstream pool: request head serialised (_serialise)", r"^_serialise \(outloop_cli/broker/upstream_pool"),
    ("upstream pool: socket send (UpstreamConnection.write)", r"^write \(outloop_cli/broker/upstream_conn"),
    ("upstream pool: llhttp parse (data_received)", r"^data_received \(outloop_cli/broker/upstream_conn"),
    ("upstream pool: response body (iter_any/read)", r"^(iter_any|read) \(outloop_cli/broker/upstream_pool"),
    ("response: head serialised + written (head/_send/StreamResponse)",
     r"^(head|_send|prepare|write|write_eof) \(outloop_cli/broker/wire"),
    ("event loop: select / epoll wait", r"^(select|poll) \((selectors|asyncio)"),
    ("event loop: _run_once bookkeeping", r"^_run_once \(asyncio/base_events"),
    ("yarl URL construction", r"\(yarl/"),
    ("multidict", r"\(multidict/"),
    ("timeouts (timer context)", r"\(asyncio/timeouts"),
]


def run_profile(seconds: float, clients: int, audit: str, loop: str, native: bool, target_kind: str,
                rate: int) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    tmp = short_tmpdir("olp-")
    OUT_DIR.mkdir(exist_ok=True)
    tag = f"{audit}-{loop}-{target_kind}-c{clients}"
    raw = OUT_DIR / f"profile-{tag}.txt"
    svg = OUT_DIR / f"profile-{tag}.svg"
    children: list[Child] = []
    try:
        upstream = Child("upstream", [PYTHON, str(BENCH_DIR / "upstream.py")])
        children.append(upstream)
        port = upstream.read(20)["port"]
        loadgen = Child("loadgen", [PYTHON, str(BENCH_DIR / "loadgen.py")])
        children.append(loadgen)
        host = start_broker("profiled", tmp, port, loadgen.pid, audit, loop)
        children.append(host)
        target = broker_targets("profiled", "profiled", host, with_tcp=True)[0 if target_kind == "unix" else 1]
        loadgen.ask({"cmd": "load", "target": target.address, "request": target.request, "clients": clients,
                     "duration": 1.0, "warmup": 0.2}, 60)  # warm caches, pools, the audit db
        base = [py_spy, "record", "--pid", str(host.pid), "--duration", str(int(seconds) + 1), "--rate", str(rate),
                "--threads"] + (["--native"] if native else [])
        spy_raw = subprocess.Popen([*base, "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        cpu_before = _thread_cpu(host.pid)
        result = loadgen.ask({"cmd": "load", "target": target.address, "request": target.request,
                              "clients": clients, "duration": seconds, "warmup": 0.0, "watch": host.pid},
                             seconds + 60)
        cpu_after = _thread_cpu(host.pid)
        cpu = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
        _, err = spy_raw.communicate(timeout=seconds + 60)
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing: {err.strip()[-500:]}")
        svg_ok = _flamegraph(raw, svg)
        return {"load": result, "raw": str(raw), "svg": str(svg) if svg_ok else None,
                "summary": summarise(raw.read_text(), cpu)}
    finally:
        for child in reversed(children):
            child.stop(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def _flamegraph(raw: Path, svg: Path) -> bool:
    """py-spy's raw output is the collapsed-stack format; render it with inferno/flamegraph.pl if present."""
    for tool in ("inferno-flamegraph", "flamegraph.pl"):
        found = shutil.which(tool)
        if found:
            with raw.open() as src, svg.open("w") as dst:
                return subprocess.run([found], stdin=src, stdout=dst, check=False).returncode == 0
    return False


def _frames(stack: str) -> list[str]:
    # py-spy frame: "function (path/to/module.py:123)"; shorten the path to the package-relative part.
    out = []
    for frame in stack.split(";"):
        frame = re.sub(r"\(.*?/(site-packages|lib/python3\.\d+|work/main)/", "(", frame)
        out.append(frame)
    return out


# Leaf frames where a thread sits blocked (py-spy cannot always tell a blocked C call from work): dropped, and
# each thread's share of the process's CPU comes from the kernel's per-thread counters (psutil) instead.
WAIT_LEAVES = re.compile(r"^(RunLog\._loop \(outloop_cli/audit|serve\.<locals>\.watch_stdin|EpollSelector\.select"
                         r"|Condition\.wait|Event\.wait|Thread\._wait_for_tstate_lock|SimpleQueue\.get)")


def _thread_cpu(pid: int) -> dict[int, float]:
    import psutil

    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def summarise(text: str, cpu: dict[int, float] | None = None) -> dict[str, Any]:
    """Per thread: busy samples, inclusive code paths and self-time leaves; weighted by the thread's real CPU."""
    compiled = [(label, re.compile(pattern)) for label, pattern in PATHS]
    records = []  # (tid, thread label, frames, bare frames, count)
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = _frames(stack)
        thread = next((f for f in frames[:2] if f.startswith("thread")), "thread (0)")
        match = re.search(r"\((\d+)\)", thread)
        code = [f for f in frames if not f.startswith(("process", "thread"))]
        bare = [re.sub(r"^[\w<>]+\.(?=\w+ \()", "", f) for f in code]  # "Class.method (" -> "method ("
        records.append((match[1] if match else "0", thread, code, bare, int(count_text)))
    roles: dict[str, str] = {}
    for tid, thread, _, bare, _ in records:
        if any(f.startswith("_loop (outloop_cli/audit/writer") for f in bare):
            roles[tid] = "audit writer thread"
        elif tid not in roles:
            roles[tid] = ("event loop thread" if "MainThread" in thread else
                          "bench helper (stdin watcher)" if "watch_stdin" in thread else
                          thread.split(": ", 1)[-1])
    busy: collections.Counter[str] = collections.Counter()
    waiting: collections.Counter[str] = collections.Counter()
    paths: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for tid, _, code, bare, count in records:
        if not code or WAIT_LEAVES.match(code[-1]):
            waiting[tid] += count
            continue
        busy[tid] += count
        for label, pattern in compiled:
            if any(pattern.search(f) for f in bare):
                paths[tid][label] += count
        leaves[tid][re.sub(r":\d+\)$", ")", code[-1])] += count
    cpu = cpu or {}
    total_cpu = sum(cpu.values()) or 0.0
    threads = []
    for tid in sorted(set(busy) | set(waiting), key=lambda t: -(cpu.get(int(t), 0.0) or busy[t])):
        seconds = cpu.get(int(tid))
        share = (seconds / total_cpu) if seconds is not None and total_cpu else None
        threads.append({"tid": tid, "role": roles[tid], "cpu_s": seconds, "cpu_share": share,
                        "busy_samples": busy[tid], "wait_samples": waiting[tid],
                        "paths": [(label, paths[tid][label] / busy[tid]) for label, _ in PATHS
                                  if busy[tid] and paths[tid][label]],
                        "leaves": [(frame, n / busy[tid]) for frame, n in leaves[tid].most_common(12)]})
    return {"threads": threads, "total_cpu_s": total_cpu}


def render(profile: dict[str, Any], header: str) -> str:
    summary = profile["summary"]
    load = profile["load"]
    lines = [f"### {header}", "",
             f"Load during the profile: {load['rps']:,.0f} req/s, p50 {load['p50_ms']:.2f} ms, "
             f"broker CPU {load.get('proxy_cpu_pct') or 0:.0f}% of a core, "
             f"{load.get('proxy_cpu_us_per_req') or 0:.0f} µs CPU/request (py-spy pauses the process to sample, "
             f"so it runs slower than unprofiled). Raw stacks: `{Path(profile['raw']).relative_to(REPO)}`.", "",
             "| thread | CPU s (kernel) | share of broker CPU | busy samples |", "|---|---:|---:|---:|"]
    for t in summary["threads"]:
        lines.append(f"| {t['role']} | {fmt(t['cpu_s'] if t['cpu_s'] is not None else float('nan'), 2)} | "
                     f"{fmt((t['cpu_share'] or float('nan')) * 100, 1)}% | {t['busy_samples']:,} |")
    for t in summary["threads"]:
        if not t["busy_samples"] or t["role"].startswith("bench helper") or (t["cpu_share"] or 0) < 0.03:
            continue
        weight = t["cpu_share"] if t["cpu_share"] is not None else float("nan")
        lines += ["", f"**{t['role']}** ({fmt(weight * 100, 0)}% of broker CPU): code paths, inclusive", "",
                  "| code path | share of this thread's busy samples | ≈ share of broker CPU |", "|---|---:|---:|"]
        lines += [f"| {label} | {share:.1%} | {fmt(share * weight * 100, 1)}% |" for label, share in t["paths"]]
        lines += ["", "| top self-time frames in this thread | share of its busy samples |", "|---|---:|"]
        lines += [f"| `{frame}` | {share:.1%} |" for frame, share in t["leaves"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--audit", choices=("real", "noop"), default="real")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--target", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (slower, noisier)")
    args = parser.parse_args()
    profile = run_profile(args.seconds, args.clients, args.audit, args.loop, args.native, args.target, args.rate)
    print(render(profile, f"broker, {args.clients} clients, audit {args.audit}, {args.loop}, {args.target}"))


if __name__ == "__main__":
    main()
