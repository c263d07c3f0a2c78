"""Two checks the local verify cannot make on its own.

`verify --central` recomputes every shipped chain in PostgreSQL with the same walk as the local verify, so an
edited or deleted central row is reported. `verify --against-central` compares this host's chains with what it
shipped: a host that rewrote its own history consistently (every hash recomputed, so the local verify passes)
no longer matches the head the central copy received.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from itertools import groupby
from typing import Final

import psycopg

from outloop_cli.audit.central_config import CentralConfig
from outloop_cli.audit.central_db import CHAIN_COLUMNS, EVENTS
from outloop_cli.audit.schema import snapshot
from outloop_cli.audit.shipped import shipped_counts
from outloop_cli.audit.verify import RunVerdict, verify_run, walk_chain

_FETCH: Final = 10_000  # rows per round trip of the server-side cursor


@dataclass(frozen=True)
class HostVerdict:
    host_id: str
    verdict: RunVerdict


def verify_central(central: psycopg.Connection) -> list[HostVerdict]:
    """Every shipped chain of every host, walked from a server-side cursor so 10 M rows never sit in memory.

    A chain without its run_end is "incomplete": the run was live or killed when shipped, or its end is not
    shipped yet. A run whose tail was deleted centrally looks the same here; --against-central tells them apart.
    """
    verdicts = []
    with central.transaction(), central.cursor(name="outloop_verify") as cursor:
        cursor.itersize = _FETCH
        cursor.execute(f"SELECT host_id, {', '.join(CHAIN_COLUMNS)} FROM {EVENTS} ORDER BY host_id, run_id, seq")
        for (host, run_id), rows in groupby(cursor, key=lambda row: (row[0], row[1])):
            chain = walk_chain(row[1:] for row in rows)
            if chain.problem is not None:  # a deleted run_start shows here too: the chain must open with it
                verdict = RunVerdict(run_id, "broken", chain.count, chain.problem, chain.bad_seq)
            else:
                status = "ok" if chain.end is not None else "incomplete"
                verdict = RunVerdict(run_id, status, chain.count, None, None)
            verdicts.append(HostVerdict(str(host), verdict))
    return verdicts


@dataclass(frozen=True)
class _CentralRun:
    count: int
    last_seq: int
    last_hash: str


def _central_runs(central: psycopg.Connection, host_id: str) -> dict[str, _CentralRun]:
    rows = central.execute(
        f"SELECT DISTINCT ON (run_id) run_id, seq, hash, count(*) OVER (PARTITION BY run_id) FROM {EVENTS} "
        "WHERE host_id = %s ORDER BY run_id, seq DESC",
        (host_id,),
    ).fetchall()
    return {str(r[0]): _CentralRun(int(r[3]), int(r[1]), str(r[2])) for r in rows}


def verify_against_central(
    local: sqlite3.Connection, central: psycopg.Connection, config: CentralConfig
) -> list[RunVerdict]:
    """This host's runs against its central copy; a run the central copy does not hold yet is only checked locally.

    "broken" when: the local hash at the last shipped seq differs (rewritten after shipping), the local chain is
    shorter than what was shipped or gone (deleted), the central copy holds fewer events than the markers say
    were shipped (deleted centrally), or the local chain itself is broken.
    """
    remote = _central_runs(central, config.host_id)
    with snapshot(local):
        shipped = shipped_counts(local)
        local_ids = {str(r[0]) for r in local.execute("SELECT run_id FROM runs UNION SELECT run_id FROM pruned")}
        verdicts = [_compare(local, run_id, remote.get(run_id), shipped.get(run_id, 0))
                    for run_id in sorted(local_ids | set(remote) | set(shipped))]
    return verdicts


def _compare(local: sqlite3.Connection, run_id: str, remote: _CentralRun | None, shipped: int) -> RunVerdict:
    def broken(problem: str, seq: int | None) -> RunVerdict:
        return RunVerdict(run_id, "broken", remote.count if remote else 0, problem, seq)

    pruned = local.execute("SELECT event_count, head_hash FROM pruned WHERE run_id = ?", (run_id,)).fetchone()
    in_runs = local.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None
    if not in_runs and pruned is None:
        return broken("the central copy holds this run but the local audit no longer does (deleted locally)", 0)
    if remote is None and shipped:
        return broken(f"{shipped} events were shipped but the central copy holds none (deleted centrally)", 0)
    if remote is not None and remote.count < shipped:
        return broken(f"{shipped} events were shipped but the central copy holds {remote.count} "
                      "(deleted centrally)", remote.count)
    if pruned is not None and not in_runs:
        if remote is not None and remote.count == pruned[0] and remote.last_hash != pruned[1]:
            return broken("the prune marker's head hash differs from the shipped chain's head", remote.last_seq)
        return RunVerdict(run_id, "pruned", pruned[0] if isinstance(pruned[0], int) else 0, None, None)
    local_verdict = verify_run(local, run_id)
    if local_verdict.status == "broken":
        return local_verdict
    if remote is None:
        return local_verdict
    row = local.execute("SELECT hash FROM events WHERE run_id = ? AND seq = ?", (run_id, remote.last_seq)).fetchone()
    if row is None:
        return broken(f"the local chain ends before event {remote.last_seq}, which was shipped "
                      "(local events deleted after shipping)", remote.last_seq)
    if row[0] != remote.last_hash:
        return broken(f"event {remote.last_seq} differs from the shipped copy: the local chain was rewritten "
                      "after shipping", remote.last_seq)
    return local_verdict

