"""The tamper-evident audit log: what every run asked for, what was decided, and how it ended.

Callers import from here; ``store`` owns the database and the chain format, ``verify`` checks chains.
"""

from outloop_cli.audit.store import (
    EventRow,
    RequestRecord,
    ResponseRecord,
    RunLog,
    RunRow,
    get_run,
    iter_events,
    list_runs,
    open_readonly,
    prune,
    query_exchanges,
    run_events,
)
from outloop_cli.audit.verify import RunVerdict, verify_all, verify_run

__all__ = [
    "EventRow",
    "RequestRecord",
    "ResponseRecord",
    "RunLog",
    "RunRow",
    "RunVerdict",
    "get_run",
    "iter_events",
    "list_runs",
    "open_readonly",
    "prune",
    "query_exchanges",
    "run_events",
    "verify_all",
    "verify_run",
]
