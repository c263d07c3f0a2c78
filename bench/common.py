"""Shared helpers for the benches: machine description, percentiles, temp homes, the bench profile.

Nothing here measures; it keeps the bench scripts short and makes them describe the machine the same way.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYCACHE = REPO / ".bench" / "pycache"
PYTHON = sys.executable
OUTLOOP = str(Path(sys.executable).parent / "outloop")

# A fixed, obviously fake secret: the upstream refuses requests that do not carry it, so every "200" in a
# bench proves the proxy under test really injected the credential.
SECRET = "bench-secret-7f3a9c1e5b2d4f60"
SECRET_ENV = "OUTLOOP_BENCH_SECRET"
WORKSPACE = "bench"
CREDENTIAL = "api"


def machine() -> dict[str, str]:
    """What the numbers were measured on: they only mean something next to this."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except Exception:
        mem = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count() or "?"),
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return (out or "?") + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def short_tmpdir(prefix: str) -> Path:
    """Unix socket paths must stay under 107 bytes, so bench homes live directly in /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def outloop_env(home: Path) -> dict[str, str]:
    """The environment benches run `outloop` in: a private OUTLOOP_HOME, the bench secret, bytecode cached.

    As installed by pip, modules come with bytecode. A dev shell may forbid writing it
    (PYTHONDONTWRITEBYTECODE=1), which would time the compiler instead of outloop, in start-up and in a run's
    first request alike; the cache stays out of the source tree, under .bench/.
    """
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OUTLOOP_") and key != "PYTHONDONTWRITEBYTECODE"}
    PYCACHE.mkdir(parents=True, exist_ok=True)
    env.update({"OUTLOOP_HOME": str(home), SECRET_ENV: SECRET, "NO_COLOR": "1", "PYTHONPYCACHEPREFIX": str(PYCACHE)})
    return env


def write_bench_profile(profiles: Path, base_url: str, child_env: dict[str, str] | None = None) -> Path:
    """One workspace, one credential injected as `Authorization: Bearer <secret>`, secret from the env.

    `child_env` (e.g. `{"UP_URL": "{url}"}`) turns on base-URL mode, as it does for an SDK's profile.
    """
    profiles.mkdir(parents=True, exist_ok=True)
    path = profiles / f"{WORKSPACE}.toml"
    extra = ""
    if child_env:
        extra = "child_env = { " + ", ".join(f'{key} = "{value}"' for key, value in child_env.items()) + " }\n"
    path.write_text(textwrap.dedent(f"""\
        version = 1
        description = "outloop bench"

        [credentials.{CREDENTIAL}]
        secret = "env:{SECRET_ENV}"
        base_url = "{base_url}"
        inject = {{ header = "Authorization", value = "Bearer {{secret}}" }}
        allow = ["GET /v1/**", "GET /big"]
        deny = ["* /v1/admin/**"]
    """) + extra)
    return path


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def system_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat); NaN where unavailable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pids: Sequence[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
    return total


def wait_for_quiet(max_wait: float, threshold: float = 0.3, log: object = None) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of one core; return the last share."""
    import time

    deadline = time.monotonic() + max_wait
    share = float("nan")
    calm = 0
    while True:
        before, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        share = (system_busy_seconds() - before) / (time.monotonic() - t0)
        calm = calm + 1 if share < threshold else 0
        if calm >= 2 or time.monotonic() >= deadline:
            return share
        if callable(log):
            log(f"  machine busy ({share:.0%} of a core used by others); waiting for it to settle...")


def run_loop_choice(coro: object, choice: str) -> None:
    """Run `coro` on uvloop when asked (or `auto` and installed), else on the stdlib loop."""
    import asyncio

    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            uvloop.run(coro)  # type: ignore[arg-type]
            return
    asyncio.run(coro)  # type: ignore[arg-type]
