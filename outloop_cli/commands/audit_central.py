"""`outloop audit ship`, `audit central init`, and the `--central` forms of the audit listings and verify.

Parses and prints only; the work is in outloop_cli.audit.central_*. psycopg is imported by those modules, which
load here only when a central command runs, so the local audit commands never pay for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from outloop_cli.audit.central_config import CentralConfig, load_central
from outloop_cli.commands.options import JsonFlag
from outloop_cli.commands.output import print_json
from outloop_cli.commands.tables import note
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, OutloopError, UsageError
from outloop_cli.home import audit_db_path, config_path, outloop_home

if TYPE_CHECKING:
    import psycopg

    from outloop_cli.audit.store import StatusRange
    from outloop_cli.audit.verify import RunVerdict

central_app = typer.Typer(help="The central PostgreSQL that every host ships its audit to ([audit.central] in "
                               "config.toml).", rich_markup_mode=None)


def register(audit_app: typer.Typer) -> None:
    audit_app.add_typer(central_app, name="central")
    audit_app.command("ship")(ship_command)


def require_config() -> CentralConfig:
    home = outloop_home()
    config = load_central(home)
    if config is None:
        raise UsageError(f"{config_path(home)} has no [audit.central] table; add one with dsn = "
                         "\"postgresql://USER@HOST/DB\" (and password, host_id); see docs/OPERATIONS.md")
    return config


@contextlib.contextmanager
def _central(config: CentralConfig | None = None) -> Iterator[tuple[CentralConfig, psycopg.Connection]]:
    from outloop_cli.audit.central_db import connect, require_schema

    config = config or require_config()
    conn = connect(config, os.environ)
    try:
        require_schema(conn, config)
        yield config, conn
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# audit central init / audit ship


@central_app.command("init")
def init_command(as_json: JsonFlag = False) -> None:
    """Create the central schema, or migrate it to this outloop's version (safe to run again, from any host)."""
    from outloop_cli.audit.central_db import connect, describe, init_schema

    config = require_config()
    conn = connect(config, os.environ)
    try:
        before, after = init_schema(conn, config)
    finally:
        conn.close()
    if as_json:
        print_json({"target": describe(config), "schema_before": before, "schema": after})
    elif before == after:
        sys.stdout.write(f"central audit schema in {describe(config)} is current (version {after})\n")
    else:
        sys.stdout.write(f"central audit schema in {describe(config)}: version {before} -> {after}\n")


def ship_command(
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Events per central transaction.")]
    = 5000,
    as_json: JsonFlag = False,
) -> None:
    """Send every event not yet in the central audit database; safe to repeat, and to kill (for cron/timers).

    Exit 4 when the server cannot be reached: the backlog stays in the local audit for the next try.
    """
    from outloop_cli.audit.central_ship import local_backlog, ship

    config = require_config()
    db_path = audit_db_path(outloop_home())
    try:
        result = ship(db_path, config, os.environ, batch_size=batch_size)
    except OutloopError as exc:
        if not db_path.is_file():
            raise
        waiting = local_backlog(db_path)
        raise type(exc)(f"{exc.message}; backlog kept locally: {waiting.events} events in {waiting.runs} runs",
                        exit_code=exc.exit_code) from None
    if as_json:
        print_json({"target": result.target, "host_id": result.host_id, "sent": result.sent, "runs": result.runs,
                    "batches": result.batches, "backlog_events": result.backlog.events,
                    "backlog_runs": result.backlog.runs})
        return
    sys.stdout.write(f"shipped {result.sent} events of {result.runs} runs to {result.target} as "
                     f"{result.host_id}; backlog {result.backlog.events} events\n")


# --------------------------------------------------------------------------------------------------
# The --central forms, called by commands.audit


def recent(limit: int, workspace: str | None, failed: bool, statuses: list[StatusRange], batch: str | None,
           as_json: bool) -> None:
    from outloop_cli.audit.central_queries import recent_runs
    from outloop_cli.audit.queries import run_record
    from outloop_cli.commands.audit import print_runs

    with _central() as (_, conn):
        runs = recent_runs(conn, limit=limit, workspace=workspace, failed=failed, statuses=statuses,
                           batch_id=batch)
    if as_json:
        print_json([{"host_id": item.host_id, **run_record(item.view)} for item in runs])
        return
    if not runs:
        note(f"no{' matching' if failed or statuses or batch else ''} runs shipped yet"
             + (f" for workspace {workspace!r}" if workspace else "") + (f" in batch {batch!r}" if batch else ""))
        return
    # Whole ids: a prefix unique on one host may not be across the fleet.
    print_runs([item.view for item in runs], {item.view.run.run_id: item.view.run.run_id for item in runs},
               hosts=[item.host_id for item in runs])


def events(*, workspace: str | None, credential: str | None, decision: str | None, since: float | None,
           until: float | None, failed: bool, statuses: list[StatusRange], limit: int, as_json: bool) -> None:
    from outloop_cli.audit.central_queries import query_exchanges
    from outloop_cli.audit.queries import exchange_record
    from outloop_cli.commands.audit import print_exchanges

    with _central() as (_, conn):
        found = query_exchanges(conn, workspace=workspace, credential=credential, decision=decision, since=since,
                                until=until, failed=failed, statuses=statuses, limit=limit)
    if as_json:
        print_json([{"host_id": item.host_id, **exchange_record(item.exchange)} for item in found])
        return
    if not found:
        note("no matching requests")
        return
    print_exchanges([item.exchange for item in found], {item.exchange.event.run_id: item.exchange.event.run_id
                                                        for item in found}, limit,
                    hosts=[item.host_id for item in found])


def show(run_id: str, limit: int, as_json: bool) -> None:
    from outloop_cli.audit.central_queries import find_run, run_exchanges
    from outloop_cli.audit.queries import exchange_record, run_record
    from outloop_cli.commands.audit import print_run

    with _central() as (_, conn):
        item = find_run(conn, run_id)
        found, total = run_exchanges(conn, item, limit=limit)
    if as_json:
        print_json({"host_id": item.host_id, **run_record(item.view), "events_total": total,
                    "events": [exchange_record(e) for e in found]})
        return
    print_run(item.view, found, total, [], host=item.host_id)


def verify(*, against: bool, as_json: bool) -> None:
    from outloop_cli.audit.central_verify import verify_against_central, verify_central
    from outloop_cli.audit.schema import open_readonly
    from outloop_cli.commands.audit import report_verdicts

    with _central() as (config, conn):
        if against:
            local = open_readonly(audit_db_path(outloop_home()))
            try:
                verdicts: list[tuple[str | None, RunVerdict]] = [
                    (config.host_id, v) for v in verify_against_central(local, conn, config)]
            finally:
                local.close()
        else:
            verdicts = [(item.host_id, item.verdict) for item in verify_central(conn)]
    if not report_verdicts(verdicts, as_json):
        raise typer.Exit(EXIT_PROBLEMS_FOUND)
