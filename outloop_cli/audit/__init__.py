"""The tamper-evident audit log: what every run asked for, what was decided, and how it ended.

One job per module: ``chain`` is the hash format, ``schema`` the database, its migrations and opening it,
``writer`` records one run, ``store`` reads (and prunes) what is stored, ``queries`` and ``tally`` are the
operator's and the summary's views of it, ``verify`` checks chains, ``export`` and ``health`` serve their
commands. The names below are the stable surface for code outside the package. Each loads with its module on
first use: a run, which needs only the writer, does not wait for the readers and the verifier before its child
starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outloop_cli.audit.schema import open_readonly
    from outloop_cli.audit.store import (
        EventRow,
        RunRow,
        get_run,
        iter_events,
        list_runs,
        prune,
        query_exchanges,
        run_events,
    )
    from outloop_cli.audit.verify import RunVerdict, verify_all, verify_run
    from outloop_cli.audit.writer import RequestRecord, ResponseRecord, RunLog

_MODULE_OF = {
    "open_readonly": "schema",
    **dict.fromkeys(("EventRow", "RunRow", "get_run", "iter_events", "list_runs", "prune", "query_exchanges",
                     "run_events"), "store"),
    **dict.fromkeys(("RunVerdict", "verify_all", "verify_run"), "verify"),
    **dict.fromkeys(("RequestRecord", "ResponseRecord", "RunLog"), "writer"),
}

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


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
