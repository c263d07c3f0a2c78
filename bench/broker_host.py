"""Host one outloop broker for the benches, built the way `outloop_cli.runner` builds a run's broker.

Profile from a TOML file, secret from `env:VAR`, a RunLog on a real audit.db (or, with `--audit noop`, a
stand-in that skips the database: it lives only here, never as a product flag), the Unix socket in a 0700
per-run dir, and the base-URL loopback listener. `--child-pid` names the load generator, so the broker's
SO_PEERCRED check admits it exactly as it would admit a run's child.

Prints one JSON line when ready; serves until SIGTERM, SIGINT or EOF on stdin; then closes the broker,
finishes the audit log and prints `{"audit_events": N}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets as token_source
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SECRET_ENV, WORKSPACE

from outloop_cli.audit.writer import RequestRecord, ResponseRecord, RunLog
from outloop_cli.broker.listeners import Listeners, bind_loopback, bind_unix
from outloop_cli.broker.server import Broker
from outloop_cli.home import audit_db_path, ensure_private_dir, profile_dirs
from outloop_cli.profiles import load_profile
from outloop_cli.runner import new_run_id
from outloop_cli.secrets import resolve_secret


class NoAudit:
    """The RunLog methods the broker calls, doing nothing: measures what the audit write costs."""

    def __init__(self) -> None:
        self._seq = 0

    def record_request(self, rec: RequestRecord) -> int:
        self._seq += 1
        return self._seq

    async def record_request_async(self, rec: RequestRecord, *, alone: bool = False) -> int:
        self._seq += 1
        return self._seq

    def record_response(self, rec: ResponseRecord) -> None:
        self._seq += 1

    async def record_response_async(self, rec: ResponseRecord) -> int:
        self._seq += 1
        return self._seq

    def record_event(self, kind: str, **fields: object) -> int:
        self._seq += 1
        return self._seq

    def finish(self, *, exit_code: int, duration: float, detail: Any) -> tuple[str, int]:
        return "", self._seq


# What-if experiments: monkeypatches that exist only in this bench process, to price a change before the lead
# makes it in outloop_cli. None of them is a product option.
TWEAKS = {
    "fewer-indexes": "events keep only the primary key, (ts) and the outcome indexes: 2 fewer B-trees per request",
    "switch-interval": "sys.setswitchinterval(0.0005): faster GIL hand-off to the audit writer thread",
    # References rather than fixes: the same process and server with outloop's handler replaced.
    "floor-server": "reference: the broker's HTTP server answering a canned 200 (no upstream, no outloop)",
    "floor-proxy": "reference: the broker's HTTP server + upstream pool, forwarding with no outloop logic",
}


def replace_handler(broker: Broker, tweaks: list[str]) -> None:
    """For the floor references: swap the broker's handler before its listeners start."""
    from outloop_cli.broker.wire import Request, Response

    if "floor-server" in tweaks:
        body = b'{"ok":true}' * 17

        async def canned(request: Request) -> Response:
            return Response(body=body, content_type="application/json")

        broker.handle = canned  # type: ignore[method-assign]
    elif "floor-proxy" in tweaks:
        from multidict import CIMultiDict
        from yarl import URL

        from outloop_cli.broker.upstream_pool import Timeouts

        credential = next(iter(broker.profile.credentials.values()))
        prefix = f"/v1/http/{credential.name}"
        auth = CIMultiDict({"Authorization": "Bearer " + os.environ[SECRET_ENV]})
        unlimited = Timeouts(connect=None, read=None)

        async def forward(request: Request) -> Response:
            url = URL(credential.base_url + request.raw_path[len(prefix):], encoded=True)
            async with await broker._pool.request("GET", url, headers=auth, data=None, timeout=unlimited) as upstream:
                return Response(body=await upstream.read(), status=upstream.status,
                                content_type=upstream.headers.get("Content-Type", "application/octet-stream"))

        broker.handle = forward  # type: ignore[method-assign]


COMMITS = {"commits": 0, "events": 0}


def apply_tweaks(tweaks: list[str], audit: Any, home: Path) -> None:
    if "switch-interval" in tweaks:
        sys.setswitchinterval(0.0005)
    if not isinstance(audit, RunLog):
        return
    # Always on (a counter costs nothing next to a commit): how well group commit batches under this load.
    commit = audit._commit

    def counted(batch: list[Any], *, begun: bool = False) -> None:
        COMMITS["commits"] += 1
        COMMITS["events"] += len(batch)
        commit(batch, begun=begun)

    audit._commit = counted  # type: ignore[method-assign]
    conn = audit._conn  # the writer thread is idle until the first request; these run before it
    if "fewer-indexes" in tweaks:
        for index in ("events_by_workspace", "events_requests_by_credential", "events_denied",
                      "events_denied_by_workspace"):
            conn.execute(f"DROP INDEX IF EXISTS {index}")


async def serve(args: argparse.Namespace) -> None:
    home = Path(args.home)
    environ = dict(os.environ)
    profile = load_profile(WORKSPACE, profile_dirs(None, {"OUTLOOP_HOME": str(home)}))
    resolved = {name: resolve_secret(cred.owner, name, cred.secret_ref, environ)
                for name, cred in profile.credentials.items()}
    run_id = new_run_id()
    ensure_private_dir(home)
    run_dir = ensure_private_dir(home / "run" / run_id)
    socket_path = run_dir / "broker.sock"
    run_token = "outloop-" + token_source.token_urlsafe(24)
    audit: Any
    if args.audit == "real":
        audit = RunLog.start(audit_db_path(home), run_id=run_id, workspace=profile.workspace,
                             command=["bench"], detail={"sandbox": {"bench": "none"}, "pid": os.getpid()})
    else:
        audit = NoAudit()
    broker = Broker(run_id=run_id, profile=profile, secrets=resolved, audit=audit, run_token=run_token,
                    child_pid=args.child_pid)
    apply_tweaks(args.tweak, audit, home)
    replace_handler(broker, args.tweak)
    listeners = Listeners(broker=bind_unix(socket_path), loopback=bind_loopback())
    port = listeners.loopback_port
    await broker.serve(listeners)
    started = time.monotonic()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        sys.stdin.read()  # EOF: the orchestrator went away (or asked us to stop)
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(json.dumps({"pid": os.getpid(), "socket": str(socket_path), "port": port, "token": run_token,
                      "run_id": run_id, "loop": type(loop).__module__.split(".")[0], "audit": args.audit,
                      "tweaks": args.tweak}),
          flush=True)
    await stop.wait()
    await broker.close()
    listeners.close()
    _, count = audit.finish(exit_code=0, duration=time.monotonic() - started, detail={"bench": True})
    print(json.dumps({"audit_events": count, **COMMITS}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", required=True, help="OUTLOOP_HOME holding profiles/bench.toml")
    parser.add_argument("--child-pid", type=int, required=True, help="pid the peer check admits")
    parser.add_argument("--audit", choices=("real", "noop"), default="real")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--tweak", action="append", default=[], choices=sorted(TWEAKS),
                        help="bench-only what-if experiment (repeatable)")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
