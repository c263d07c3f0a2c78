"""Fan-out: `outloop run --each ...` runs one full, separate `outloop run -w W` per selected workspace.

Each run is its own `outloop run` process, in its own session and process group: its own broker, sandbox,
secrets, event loop and audit chain, exactly as if cron had started it. One process per run (rather than threads
or in-process calls) is what makes `--parallel` safe: a run installs signal handlers, marks itself non-dumpable
before reading secrets, and holds only its own workspace's secrets; none of that can be shared. The batch process
itself never reads a secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from outloop_cli.audit.schema import open_readonly
from outloop_cli.audit.store import get_run, list_runs, run_events
from outloop_cli.audit.verify import verify_run
from outloop_cli.errors import AuditError, OutloopError, ProfileError
from outloop_cli.home import audit_db_path, outloop_home, profile_dirs
from outloop_cli.profiles import available_workspaces, check_workspace_name, load_profile, runnable_workspaces

ALL = "all"
TAG_PREFIX = "@"
# The batch's exit code counts the workspaces that did not succeed, capped so it never reaches the codes
# 124-127 that name a single run's outcome (the convention of GNU parallel).
MAX_COUNTED_FAILURES = 100
RunState = Literal["ok", "failed", "not_started", "stopped", "skipped"]


@dataclass(frozen=True)
class BatchRequest:
    selection: str
    command: Sequence[str]
    batch_id: str
    profiles_dir: Path | None = None
    timeout: float | None = None  # seconds, already checked by `run`
    network: str | None = None
    parallel: int = 1
    fail_fast: bool = False
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class BatchRun:
    """One workspace's line in the combined summary; `report` is that run's own --summary-json when it ran."""

    workspace: str
    state: RunState = "skipped"
    exit_code: int | None = None
    run_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    duration: float | None = None
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    flagged: int = 0
    chain: str | None = None  # the run's audit verdict: ok, incomplete, broken
    error: str | None = None
    report: dict[str, Any] | None = None


@dataclass
class BatchReport:
    batch_id: str
    selection: str
    command: list[str]
    started_at: float
    duration: float
    parallel: int
    fail_fast: bool
    exit_code: int
    runs: list[BatchRun]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def select_workspaces(selection: str, dirs: Sequence[Path]) -> list[str]:
    """`acme,globex`, `@crm` (profiles tagged crm), `all` (every workspace), or a comma list mixing them.

    Order: as written, tags and `all` expanding in name order; each workspace once. A name that has no profile, a
    tag nobody carries, or an empty selection is a usage error, so a typo in a cron line fails loudly.
    """
    found = runnable_workspaces(dirs)  # `all` and tags never pick a base (abstract = true)
    named = available_workspaces(dirs)  # a base named outright is refused by its run, with the reason
    chosen: list[str] = []
    items = [item.strip() for item in selection.split(",")]
    if not any(items):
        raise OutloopError("--each: name workspaces (acme,globex), a tag (@crm) or `all`")
    for item in items:
        if not item:
            raise OutloopError(f"--each: empty item in {selection!r}; separate workspaces with single commas")
        if item == ALL:
            chosen += sorted(found)
        elif item.startswith(TAG_PREFIX):
            chosen += _tagged(item[len(TAG_PREFIX):], found, dirs)
        else:
            check_workspace_name(item)
            if item not in named:
                raise OutloopError(f"--each: no profile for workspace {item!r}; known: {', '.join(sorted(found))}")
            chosen.append(item)
    unique = list(dict.fromkeys(chosen))
    if not unique:
        raise OutloopError(f"--each {selection}: selects no workspace; profiles searched: "
                         f"{', '.join(str(d) for d in dirs)}")
    return unique


def _tagged(tag: str, found: Mapping[str, Path], dirs: Sequence[Path]) -> list[str]:
    tagged, unreadable = [], []
    for name in sorted(found):
        try:
            if tag in load_profile(name, dirs).tags:
                tagged.append(name)
        except ProfileError:
            unreadable.append(name)
    if not tagged:
        hint = f" ({', '.join(unreadable)} could not be read: `outloop workspace check`)" if unreadable else ""
        raise OutloopError(f"--each @{tag}: no workspace has `tags = [\"{tag}\"]`{hint}")
    if unreadable:
        raise OutloopError(f"--each @{tag}: cannot tell whether {', '.join(unreadable)} carry the tag, their "
                         "profiles do not load; fix them (`outloop workspace check`) or name workspaces")
    return tagged


def batch_exit_code(runs: Sequence[BatchRun]) -> int:
    """0 when every run succeeded, else how many did not (failed, stopped, skipped, never started), at most 100."""
    return min(sum(1 for run in runs if run.state != "ok"), MAX_COUNTED_FAILURES)


def run_batch(request: BatchRequest, on_start: Callable[[BatchRun], None] = lambda run: None) -> BatchReport:
    home = outloop_home(request.environ)
    dirs = profile_dirs(request.profiles_dir, request.environ)
    workspaces = select_workspaces(request.selection, dirs)
    runs = [BatchRun(workspace) for workspace in workspaces]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="outloop-batch-") as scratch, _Scheduler(request) as scheduler:
        for run in runs:
            if scheduler.stopping:
                break
            scheduler.wait_for_slot()
            if scheduler.stopping:
                break
            scheduler.start(run, Path(scratch) / f"{run.workspace}.json")
            on_start(run)
        scheduler.wait_all()
    _fill_from_audit(audit_db_path(home), request.batch_id, runs)
    return BatchReport(batch_id=request.batch_id, selection=request.selection, command=list(request.command),
                       started_at=started, duration=time.time() - started, parallel=request.parallel,
                       fail_fast=request.fail_fast, exit_code=batch_exit_code(runs), runs=runs)


class _Scheduler:
    """Starts `outloop run` processes, at most `parallel` at a time, and stops them on --fail-fast or a signal."""

    def __init__(self, request: BatchRequest) -> None:
        self.request = request
        self.running: dict[int, tuple[subprocess.Popen[bytes], BatchRun, Path]] = {}
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Scheduler:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[signum] = signal.signal(signum, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_all(signal.SIGTERM)  # only if something went wrong: normally nothing is running by now
        self.wait_all()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """The runs live in their own sessions, so a terminal's Ctrl-C reaches only us: pass it on, start no more."""
        self.stopping = True
        self._stop_all(signum)

    def _stop_all(self, signum: int) -> None:
        for process, run, _ in self.running.values():
            run.state = "stopped"
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)  # the run forwards it to its loop's tree and records its end

    def start(self, run: BatchRun, summary: Path) -> None:
        request = self.request
        argv = [sys.executable, "-m", "outloop_cli", "run", "-w", run.workspace, "--quiet",
                "--summary-json", str(summary), "--batch-id", request.batch_id]
        if request.profiles_dir is not None:
            argv += ["--profiles", str(request.profiles_dir)]
        if request.timeout is not None:
            argv += ["--timeout", f"{request.timeout!r}s"]
        if request.network is not None:
            argv += ["--network", request.network]
        argv += ["--", *request.command]
        run.started_at = time.time()
        run.state = "failed"  # until it exits 0
        # Own session: a terminal's signals reach only the batch, which passes them on. No stdin: runs side by
        # side cannot share one, and a run in its own session cannot take the terminal's foreground anyway.
        process = subprocess.Popen(argv, env=dict(request.environ), start_new_session=True,
                                   stdin=subprocess.DEVNULL)
        self.running[process.pid] = (process, run, summary)

    def wait_for_slot(self) -> None:
        while len(self.running) >= max(1, self.request.parallel):
            self._reap_one()

    def wait_all(self) -> None:
        while self.running:
            self._reap_one()

    def _reap_one(self) -> None:
        # WNOWAIT: learn that some child exited without reaping it, so Popen.poll() below still gets its status.
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        for pid, (process, run, summary) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[pid]
            self._finished(run, code, summary)

    def _finished(self, run: BatchRun, code: int, summary: Path) -> None:
        run.exit_code = code if code >= 0 else 128 - code  # killed outright: the shell's 128+N
        run.ended_at = time.time()
        if run.state != "stopped":
            run.state = "ok" if code == 0 else "failed"
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(summary.read_text())
            if isinstance(report, dict):
                run.report = report
        if run.state == "failed" and self.request.fail_fast and not self.stopping:
            self.stopping = True
            self._stop_all(signal.SIGTERM)


def _fill_from_audit(db_path: Path, batch_id: str, runs: Sequence[BatchRun]) -> None:
    """Each run's id, times, counts, errors and chain verdict as the audit recorded them.

    The audit, not the child processes, is the record: it also holds runs that failed before they started (a
    bad profile, a missing secret), which wrote no summary.
    """
    try:
        conn = open_readonly(db_path)
    except AuditError as exc:
        for run in runs:
            run.error = run.error or exc.message
        return
    try:
        recorded = {row.workspace: row for row in list_runs(conn, limit=len(runs) + 1000, batch_id=batch_id)}
        for run in runs:
            report_id = run.report.get("run_id") if run.report else None
            row = get_run(conn, report_id) if isinstance(report_id, str) else recorded.get(run.workspace)
            if row is None:
                continue
            run.run_id = row.run_id
            run.started_at, run.ended_at, run.duration = row.started_at, row.ended_at, row.duration
            run.allowed, run.denied = row.allowed, row.denied
            run.errors = row.errors
            run.chain = verify_run(conn, row.run_id).status
            if run.report is not None:
                run.flagged = sum(int(count) for count in dict(run.report.get("flagged") or {}).values())
            else:
                run.state = "not_started" if run.state != "stopped" else run.state
                run.error = _start_error(conn, row.run_id)
    except sqlite3.Error as exc:
        for run in runs:
            run.error = run.error or f"cannot read the audit database: {exc}"
    finally:
        conn.close()


def _start_error(conn: sqlite3.Connection, run_id: str) -> str | None:
    events = run_events(conn, run_id, limit=1)
    detail = events[0].detail if events else None
    error = detail.get("error") if detail else None
    return error if isinstance(error, str) else None
