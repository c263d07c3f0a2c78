"""One `outloop run`, start to finish: profile, secrets, audit, broker, sandboxed child, report.

The command layer only parses flags into a RunRequest and prints the RunReport; every decision is made here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets as token_source
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from outloop_cli.audit.tally import Counts, Tally
    from outloop_cli.broker.ca import RunCA
    from outloop_cli.broker.server import Broker

from outloop_cli.audit.schema import open_readonly
from outloop_cli.audit.writer import RunLog
from outloop_cli.broker.egress import EgressPolicy, credential_hosts
from outloop_cli.broker.listeners import Listeners, bind_loopback, bind_unix
from outloop_cli.errors import OutloopError, ProfileError
from outloop_cli.guard import Guard, load_guard
from outloop_cli.home import audit_db_path, current_workspace, ensure_private_dir, outloop_home, profile_dirs
from outloop_cli.linux import set_not_dumpable
from outloop_cli.modes import NetworkMode
from outloop_cli.policy_snapshot import policy_hash
from outloop_cli.profiles import Credential, Profile, check_workspace_name, load_profile, refuse_abstract
from outloop_cli.proxy_env import proxy_environment
from outloop_cli.sandbox.plan import Plan, Target
from outloop_cli.sandbox.plan import plan as sandbox_plan
from outloop_cli.secrets import Secret, resolve_secret
from outloop_cli.supervisor import Supervisor, child_environment, resolve_command
from outloop_cli.timespec import iso_time

MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
_PRELOAD_DELAY = 0.5  # seconds after the child started before the shipper is imported (see _preload_shipping)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True)
class RunRequest:
    command: Sequence[str]
    workspace: str | None = None
    profiles_dir: Path | None = None
    timeout: float | None = None
    network: NetworkMode | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    batch_id: str | None = None  # set by `run --each`: recorded with the run so `audit --batch` finds it
    notify: bool = True  # False for `doctor -w`'s no-op run: a pre-flight check must not page anyone


@dataclass
class RunReport:
    """Everything the summary shows; also written as JSON by --summary-json (schema: docs/OPERATIONS.md).

    Never holds a secret. The request counts come from the run's audit events, so they agree with `outloop audit`;
    ``counts_error`` says why they are missing when the log could not be read back.
    """

    run_id: str
    workspace: str
    command: list[str]
    exit_code: int
    duration: float
    started_at: float
    timed_out: bool
    signal: int | None
    tally: Tally
    sandbox: dict[str, str]
    peak_rss_bytes: int
    cpu_seconds: float
    strays_killed: int
    audit_head: str
    audit_events: int
    audit_db: str
    limit_hit: str | None = None
    counts_error: str | None = None
    central: str | None = None  # what shipping to the central audit database did, when it is configured
    policy_hash: str = ""
    batch_id: str | None = None
    notify: dict[str, Any] | None = None  # what the [notify] hook did, when it ran (notify.NotifyOutcome)
    warnings: list[str] = field(default_factory=list)  # things the operator must act on, e.g. an unstored token

    def to_json(self) -> dict[str, Any]:
        """Stable snake_case keys; credential names are the only keys taken from the profile."""
        data = asdict(self)
        tally = data.pop("tally")
        data["started"] = iso_time(self.started_at)
        data["requests"] = _counts_json(self.tally.total)
        data["credentials"] = {name: _counts_json(counts) for name, counts in self.tally.credentials.items()}
        data["unattributed"] = _counts_json(self.tally.unattributed)
        data["denials"] = tally["denials"]
        data["errors"] = tally["failures"]
        data["flagged"] = tally["flags"]
        return data


def _counts_json(counts: Counts) -> dict[str, int]:
    return {"requests": counts.requests, **asdict(counts)}


def new_run_id(now: float | None = None) -> str:
    """ULID-style: 48-bit milliseconds then 80 random bits in Crockford base32, so ids sort by start time."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def resolve_workspace(requested: str | None, environ: Mapping[str, str]) -> str:
    if requested:
        return check_workspace_name(requested)  # before anything is recorded under that name
    chosen = current_workspace(outloop_home(environ), environ)
    if chosen:
        return check_workspace_name(chosen)
    raise ProfileError("no workspace chosen: pass -w WORKSPACE, set OUTLOOP_WORKSPACE, "
                       "or run `outloop workspace use WORKSPACE`")


def _base_url_env(profile: Profile, url: str, run_token: str) -> dict[str, str]:
    """OUTLOOP_URL, OUTLOOP_TOKEN and each credential's child_env, for SDKs configured by environment."""
    env = {"OUTLOOP_URL": url, "OUTLOOP_TOKEN": run_token}
    for name, credential in profile.credentials.items():
        for key, template in credential.child_env.items():
            env[key] = template.replace("{url}", f"{url}/v1/http/{name}").replace("{token}", run_token)
    return env


def execute(request: RunRequest) -> RunReport:
    """Run the command under a broker and return the report; OutloopError means the child never started."""
    set_not_dumpable()  # before any secret is read: same-uid processes can no longer read our memory
    environ = request.environ
    home = outloop_home(environ)
    workspace = resolve_workspace(request.workspace, environ)
    resolved_secrets: dict[str, Secret] = {}
    profile: Profile | None = None
    try:
        dirs = profile_dirs(request.profiles_dir, environ)
        profile = load_profile(workspace, dirs)
        refuse_abstract(profile, dirs)
        timeout = request.timeout if request.timeout is not None else profile.run.timeout
        network = request.network or profile.run.network
        for name, cred in profile.credentials.items():
            resolved_secrets[name] = _resolve(cred, environ)
        refuse_secrets_in_child_env(profile, environ, resolved_secrets)
        guard = load_guard(profile, dirs)
        report = _start(request, home, profile, resolved_secrets, timeout, guard,
                        _prepare(request, home, dirs, profile, network))
    except _StartFailed as failure:
        raise failure.error from None
    except OutloopError as error:
        _record_failed_start(home, workspace, request, error, profile)
        raise
    finally:
        for secret in resolved_secrets.values():
            secret.wipe()
    report.central = ship_after_run(home, environ, report.run_id)
    return report


def ship_after_run(home: Path, environ: Mapping[str, str], run_id: str) -> str | None:
    """Try to ship this run's events to the central audit database, if one is configured; never raises.

    The local audit already holds the run, so a slow or absent server costs at most the configured timeout
    and a line in the summary, never the exit code; `outloop audit ship` sends what this could not.
    """
    from outloop_cli.audit.central_config import load_central  # this and the rest below: after the child
    from outloop_cli.audit.central_probe import unreachable

    try:
        config = load_central(home)
        if config is None:
            return None
        down = unreachable(config.dsn, config.timeout)
        if down is not None:
            return f"not shipped: cannot connect to the central audit database ({down}); `outloop audit ship` " \
                   "sends it later"
        from outloop_cli.audit.central_ship import ship  # psycopg loads only where shipping is configured

        result = ship(audit_db_path(home), config, environ, run_id=run_id, timeout=config.timeout)
    except Exception as exc:  # whatever went wrong, the run itself succeeded or failed on its own terms
        reason = exc.message if isinstance(exc, OutloopError) else f"unexpected {type(exc).__name__}"
        return f"not shipped: {reason}; `outloop audit ship` sends it later"
    return f"shipped {result.sent} events to {result.target} as {result.host_id}"


def _resolve(credential: Credential, environ: Mapping[str, str]) -> Secret:
    if credential.auth is None:
        return resolve_secret(credential.owner, credential.name, credential.secret_ref, environ)
    from outloop_cli.auth.documents import resolve_credential_secret  # loaded only by runs that need it

    return resolve_credential_secret(credential, environ)


MIN_SUBSTRING_SECRET = 8  # shorter secrets are only refused as a whole value: "abc" may well occur in a PATH


def refuse_secrets_in_child_env(profile: Profile, environ: Mapping[str, str], secrets: Mapping[str, Secret]) -> None:
    """The child never holds a secret, even where the profile's author put one in its reach by mistake: a key
    pasted into env_set or child_env, or an env_keep glob passing a variable that holds a key (ProfileError, 125).

    The message names the variable and the credential, never the value.
    """
    values = dict(child_environment(environ, profile.run.env_keep, profile.run.env_set, {}))
    for credential in profile.credentials.values():
        values.update(credential.child_env)
    for name, secret in secrets.items():
        auth = profile.credentials[name].auth
        if auth is None:
            _refuse_in(values, secret.reveal(), profile, name)
            continue
        from outloop_cli.auth.documents import document_values

        for value in document_values(auth, secret.reveal()):  # each field of an `auth` credential's document
            _refuse_in(values, value, profile, name)


def _refuse_in(values: Mapping[str, str], value: str, profile: Profile, name: str) -> None:
    if value:
        for variable, text in values.items():
            if text == value or (len(value) >= MIN_SUBSTRING_SECRET and value in text):
                raise ProfileError(
                    f"{profile.path}: the child's environment variable {variable} would hold the secret of "
                    f"credential {name!r}; remove it from run.env_keep, run.env_set or child_env")


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop (a dependency on Linux): it cuts the broker's CPU per request by about a quarter. Elsewhere asyncio's."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.new_event_loop
    return uvloop.new_event_loop


class _StartFailed(Exception):
    """An OutloopError raised after the run was already recorded; carries it past the failed-start recorder."""

    def __init__(self, error: OutloopError) -> None:
        super().__init__(error.message)
        self.error = error


def _record_failed_start(home: Path, workspace: str, request: RunRequest, error: OutloopError,
                         profile: Profile | None) -> None:
    """A run that never started still belongs in "what ran last night"; best effort, the error matters more.
    Once the profile loaded, its [notify] hook hears of it too: a missing secret is what cron must report."""
    run_id = new_run_id()
    try:
        log: RunLog | None = RunLog.start(audit_db_path(home), run_id=run_id, workspace=workspace,
                                          command=list(request.command),
                                          detail={"error": error.message, **_batch_detail(request)})
    except OutloopError:
        log = None
    detail = _start_failure_detail(profile, run_id, request, error)
    if log is not None:
        with contextlib.suppress(OutloopError):
            log.finish(exit_code=error.exit_code, duration=0.0, detail=detail)


def _start_failure_detail(profile: Profile | None, run_id: str, request: RunRequest, error: OutloopError
                          ) -> dict[str, object]:
    """The end record of a run that never started, after its [notify] hook (if any) was told."""
    detail: dict[str, object] = {"error": error.message, "started": False}
    if profile is not None and request.notify:
        summary = {"run_id": run_id, "workspace": profile.workspace, "command": list(request.command),
                   "exit_code": error.exit_code, "started": False, "error": error.message}
        detail["notify"] = notify_after_run(profile, summary, request.environ)
    return detail


def notify_after_run(profile: Profile, summary: Mapping[str, Any], environ: Mapping[str, str]
                     ) -> dict[str, Any] | None:
    """The [notify] step: run the hook when the run meets one of its conditions; None when it did not run.

    It runs before the run's log is closed, and its outcome goes into the end record (so into the hash chain);
    the summary it reads therefore has no audit head yet. Its result never changes the run's exit code.
    """
    if profile.notify is None:
        return None
    from outloop_cli.notify import run_hook, triggers

    fired = triggers(profile.notify.on, summary)
    if not fired:
        return None
    return run_hook(profile.notify.command, fired, summary, environ).to_json()


def _batch_detail(request: RunRequest) -> dict[str, str]:
    return {"batch_id": request.batch_id} if request.batch_id else {}


@dataclass
class _Prepared:
    """A run made ready for its child: the run dir, the sandbox plan, the bound listeners and the committed
    run_start row. Everything the child needs exists before it is spawned; what only the broker needs loads after."""

    run_id: str
    started_at: float
    run_dir: Path
    plan: Plan
    argv: list[str]
    env: dict[str, str]
    listeners: Listeners
    audit: RunLog
    ca: tuple[RunCA, Path] | None
    url: str | None
    run_token: str | None  # base-URL mode only
    policy: str

    def release(self) -> None:
        """Close the listeners and remove the run dir; a second call finds nothing left to do."""
        self.listeners.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _prepare(request: RunRequest, home: Path, dirs: list[Path], profile: Profile, network: str) -> _Prepared:
    run_id = new_run_id()
    started_at = time.time()
    run_dir = ensure_private_dir(home / "run" / run_id, within=home)
    socket_path = run_dir / "broker.sock"
    if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise OutloopError(
            f"the broker socket path {socket_path} is {len(os.fsencode(socket_path))} bytes, over the "
            f"{MAX_UNIX_SOCKET_PATH}-byte limit of Unix sockets; set OUTLOOP_HOME to a shorter path"
        )
    base_url_mode = any(cred.child_env for cred in profile.credentials.values())
    relay_socket = run_dir / "loopback.sock" if base_url_mode else None
    proxy_socket = run_dir / "proxy.sock"
    pending_ca = _RunCAInBackground(profile) if profile.run.proxy is not False else None
    run_token = "outloop-" + token_source.token_urlsafe(24)
    outloop_vars = {"OUTLOOP_SOCKET": str(socket_path), "OUTLOOP_RUN_ID": run_id,
                    "OUTLOOP_WORKSPACE": profile.workspace}
    env = child_environment(request.environ, profile.run.env_keep, profile.run.env_set, outloop_vars)
    try:
        executable = resolve_command(request.command, env)
        plan = sandbox_plan(profile, network, Target(executable=executable, search_path=env.get("PATH", os.defpath),
                                                     home=home, run_dir=run_dir, environ=request.environ,
                                                     profile_dirs=dirs), relay_socket, proxy_socket)
    except OutloopError:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    ca = pending_ca.result(run_dir) if pending_ca is not None and plan.proxy_port is not None else None
    if plan.child_home is not None:
        env["HOME"] = plan.child_home  # the workspace's own: caches persist per client, never across clients
    argv = plan.command([executable, *request.command[1:]])
    listeners = _bind(socket_path, relay_socket if plan.relay_port is not None else None,
                      loopback=base_url_mode and plan.relay_port is None,
                      proxy_socket=proxy_socket if plan.proxy_port is not None else None)
    listeners.relay_port, listeners.proxy_port = plan.relay_port, plan.proxy_port
    url = None
    if base_url_mode:
        url = f"http://127.0.0.1:{plan.relay_port or listeners.loopback_port}"
        env.update(_base_url_env(profile, url, run_token))
    if plan.proxy_port is not None:
        env.update(proxy_environment(plan.proxy_port, ca[1] if ca else None))

    policy = policy_hash(profile)
    try:
        audit = RunLog.start(audit_db_path(home), run_id=run_id, workspace=profile.workspace,
                             command=list(request.command), detail={"sandbox": plan.layers, "pid": os.getpid(),
                                                                    "policy_hash": policy, **_batch_detail(request)})
    except OutloopError:  # an unusable audit.db: nothing may run, and nothing of this run stays behind
        listeners.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return _Prepared(run_id=run_id, started_at=started_at, run_dir=run_dir, plan=plan, argv=argv, env=env,
                     listeners=listeners, audit=audit, ca=ca, url=url,
                     run_token=run_token if base_url_mode else None, policy=policy)


def _start(request: RunRequest, home: Path, profile: Profile, resolved: Mapping[str, Secret],
           timeout: float | None, guard: Guard | None, run: _Prepared) -> RunReport:
    """Spawn the child, then load the event loop while it starts, then supervise it and serve its broker.

    asyncio (~30 ms of imports) and the event loop are made after the spawn, on this core, while the child's
    sandbox comes up on the other: nothing of them is needed before the child exists.
    """
    supervisor = Supervisor(run.argv, run.env, timeout, wrapped=run.plan.wrapper_persists)
    try:
        try:
            child_pid = supervisor.spawn(run.argv[0])
        except OutloopError as error:
            run.audit.finish(exit_code=error.exit_code, duration=0.0,
                             detail=_start_failure_detail(profile, run.run_id, request, error))
            raise _StartFailed(error) from None
        import asyncio

        with asyncio.Runner(loop_factory=_event_loop_factory()) as loop_runner:
            return loop_runner.run(_supervise(request, home, profile, resolved, timeout, guard, run, supervisor,
                                              child_pid))
    finally:
        supervisor.release_signals()
        run.release()


async def _supervise(request: RunRequest, home: Path, profile: Profile, resolved: Mapping[str, Secret],
                     timeout: float | None, guard: Guard | None, run: _Prepared, supervisor: Supervisor,
                     child_pid: int) -> RunReport:
    import asyncio

    from outloop_cli.preload import BackgroundImport  # asyncio too: loaded once the child runs

    run_id, plan, audit, ca = run.run_id, run.plan, run.audit, run.ca
    broker: Broker | None = None
    broker_stack: BackgroundImport | None = None
    shipper: threading.Timer | None = None
    try:
        # The broker stack (~45 ms of CPU with asyncio) loads on a side thread while the child starts on the other core
        # and this thread only waits: not before, where it would hold the interpreter's lock against the run's own
        # start. The broker serves once it is loaded; connections made meanwhile wait in the backlog. A child that
        # exits first cancels the import.
        child = asyncio.ensure_future(supervisor.wait())  # reaping and forwarding first, then the imports
        broker_stack = BackgroundImport("outloop_cli.broker.server")
        # Cancelled from the reaper's thread the moment the child exits: the import then stops at its next import
        # statement, instead of holding the interpreter's lock against the event loop that has to hear of it.
        supervisor.on_exit(broker_stack.cancel)
        shipper = _preload_shipping(home)
        server = await _before_exit(child, asyncio.ensure_future(broker_stack.module()))
        if server is not None:
            broker = server.Broker(run_id=run_id, profile=profile, secrets=resolved, audit=audit,
                                   run_token=run.run_token, timeout=timeout, guard=guard, ca=ca[0] if ca else None,
                                   own_url=run.url, child_pid=child_pid)
            await broker.serve(run.listeners)
        else:
            broker_stack.cancel()
        result = await child
    finally:
        if broker_stack is not None:
            broker_stack.stop()
        if shipper is not None:  # a preload that has not begun is not needed; one under way is joined, not raced
            shipper.cancel()
            shipper.join()
        if broker is not None:
            await broker.close()
        run.release()

    limit_hit = _limit_hit(profile, result.exit_code, result.cpu_seconds)
    end_detail: dict[str, object] = {
        "limit_hit": limit_hit,
        "timed_out": result.timed_out, "signal": result.signal, "strays_killed": result.strays_killed,
        "peak_rss_bytes": result.peak_rss_bytes, "cpu_seconds": round(result.cpu_seconds, 3),
        "sandbox": plan.layers,
    }

    def report(tally: Tally, counts_error: str | None, head: str = "", events: int = 0) -> RunReport:
        return RunReport(
            run_id=run_id, workspace=profile.workspace, command=list(request.command), exit_code=result.exit_code,
            duration=result.duration, started_at=run.started_at, timed_out=result.timed_out, signal=result.signal,
            tally=tally, counts_error=counts_error, sandbox=plan.layers,
            peak_rss_bytes=result.peak_rss_bytes, cpu_seconds=result.cpu_seconds,
            strays_killed=result.strays_killed, audit_head=head, audit_events=events,
            audit_db=str(audit_db_path(home)), limit_hit=limit_hit, policy_hash=run.policy,
            batch_id=request.batch_id, warnings=list(broker.warnings) if broker is not None else [],
        )

    if profile.notify is None or not request.notify:
        head, count = audit.finish(exit_code=result.exit_code, duration=result.duration, detail=end_detail)
        return report(*_tally(home, run_id, profile), head, count)
    # The hook reads the counts before the log closes, so its outcome can go into the end record. This
    # synchronous event commits every outcome still queued, so the counts read back after it are complete.
    audit.record_event("notify", detail={"armed": list(profile.notify.on)})
    notified = report(*_tally(home, run_id, profile))
    notified.notify = end_detail["notify"] = notify_after_run(
        profile, {**notified.to_json(), "audit_head": None, "audit_events": None}, request.environ)
    notified.audit_head, notified.audit_events = audit.finish(exit_code=result.exit_code,
                                                              duration=result.duration, detail=end_detail)
    return notified


class _RunCAInBackground:
    """The run's CA, made on a thread while the sandbox is probed and planned (importing `cryptography` and
    signing cost tens of milliseconds that would otherwise add to every proxied run's start-up).

    Only for runs where some credential host can be intercepted; `result` writes the child's bundle (system
    roots + CA) and returns both, or None when there is nothing to intercept.
    """

    def __init__(self, profile: Profile) -> None:
        hosts = credential_hosts({name: cred.base_url for name, cred in profile.credentials.items()})
        self._names = EgressPolicy(hosts, ()).intercepted_names
        self._ca: RunCA | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._make, name="outloop-run-ca", daemon=True)
        if self._names:
            self._thread.start()

    def _make(self) -> None:
        try:
            from outloop_cli.broker.ca import RunCA  # cryptography: paid only by runs whose proxy intercepts

            self._ca = RunCA(self._names)
        except BaseException as exc:  # raised again on the run's own thread, in result()
            self._error = exc

    def result(self, run_dir: Path) -> tuple[RunCA, Path] | None:
        if not self._names:
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._ca is not None
        return self._ca, self._ca.write_bundle(run_dir / "ca-bundle.pem")


def _tally(home: Path, run_id: str, profile: Profile) -> tuple[Tally, str | None]:
    """The run's counts read back from its audit events; a read failure must not cost the child's exit code."""
    from outloop_cli.audit.tally import Counts, Tally, run_tally

    try:
        conn = open_readonly(audit_db_path(home))
        try:
            return run_tally(conn, run_id, profile.credentials), None
        finally:
            conn.close()
    except (OutloopError, sqlite3.Error) as exc:
        return Tally({name: Counts() for name in profile.credentials}), str(exc)


def _bind(socket_path: Path, relay_socket: Path | None, *, loopback: bool, proxy_socket: Path | None) -> Listeners:
    try:
        return Listeners(broker=bind_unix(socket_path),
                         relay=bind_unix(relay_socket) if relay_socket is not None else None,
                         loopback=bind_loopback() if loopback else None,
                         proxy=bind_unix(proxy_socket) if proxy_socket is not None else None)
    except OSError as exc:
        raise OutloopError(f"cannot create the broker's socket in {socket_path.parent}: {exc.strerror}") from None


async def _before_exit(child: asyncio.Future[Any], loading: asyncio.Future[ModuleType | None]
                       ) -> ModuleType | None:
    """The broker stack's module when its import finished while the child still runs; otherwise None, and the
    wait for it is cancelled (as is the import, by the reaper)."""
    import asyncio

    await asyncio.wait((child, loading), return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and not child.done():
        return loading.result()  # an import that failed raises here; None when the child's exit cancelled it
    loading.cancel()
    return None


def _preload_shipping(home: Path) -> threading.Timer:
    """Import the shipper (psycopg: a few hundred ms of CPU) while the child runs, not after it.

    Not before the child has had a moment to start: on a small machine the import would compete with the
    child's own start-up for the CPU, and start-up must cost the same with or without a central database. The
    config is read on the timer's thread too, so a run that ends within the delay never reads it twice.
    """

    def work() -> None:
        from outloop_cli.audit.central_config import load_central
        from outloop_cli.audit.central_probe import unreachable

        try:
            config = load_central(home)
        except OutloopError:
            return  # reported by ship_after_run, which never fails the run either
        if config is None or unreachable(config.dsn, config.timeout) is not None:
            return  # a server that is down costs the run nothing; ship_after_run says so
        with contextlib.suppress(Exception):  # ship_after_run imports it again and reports what fails
            importlib.import_module("outloop_cli.audit.central_ship")

    timer = threading.Timer(_PRELOAD_DELAY, work)
    timer.name, timer.daemon = "outloop-ship-import", True
    timer.start()
    return timer


def _limit_hit(profile: Profile, exit_code: int, cpu_seconds: float) -> str | None:
    """Which rlimit ended the run, where the kernel says so: SIGXCPU (or the hard limit's SIGKILL after the
    tree used its CPU allowance) is cpu_seconds' own signature.

    Memory and process limits make allocations and forks fail inside the loop, which the loop reports itself;
    rlimits leave no trace outside it (cgroup v2 event counters would, see docs/SANDBOX.md).
    """
    limit = profile.run.cpu_seconds
    if limit and (exit_code == 128 + signal.SIGXCPU
                  or (exit_code == 128 + signal.SIGKILL and cpu_seconds >= limit)):
        return "cpu_seconds"
    return None
