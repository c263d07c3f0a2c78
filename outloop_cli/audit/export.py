"""Write audit events out as JSON lines or CSV, streaming, for a SIEM, a spreadsheet or an archive.

JSON lines keep every field exactly as stored (the hashes can be re-checked from them); CSV is for people.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Final, TextIO

from outloop_cli.audit.chain import EVENT_COLUMNS
from outloop_cli.audit.queries import event_record
from outloop_cli.audit.store import EventRow

FORMATS: Final = ("jsonl", "csv")
CSV_COLUMNS: Final = ("time", *EVENT_COLUMNS, "hash")
# A cell starting with one of these is run as a formula by spreadsheet programs; the path comes from the
# loop, which outloop does not trust, so CSV cells get OWASP's leading quote (JSON lines stay exact).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def write_events(events: Iterable[EventRow], out: TextIO, fmt: str) -> int:
    """Write every event in `fmt`; return how many."""
    if fmt == "jsonl":
        return _write_jsonl(events, out)
    if fmt == "csv":
        return _write_csv(events, out)
    raise ValueError(f"unknown export format {fmt!r}")


def _write_jsonl(events: Iterable[EventRow], out: TextIO) -> int:
    count = 0
    for event in events:
        out.write(json.dumps(event_record(event), separators=(",", ":"), ensure_ascii=False) + "\n")
        count += 1
    return count


def _write_csv(events: Iterable[EventRow], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for event in events:
        record = event_record(event)
        writer.writerow([_cell(record[column]) for column in CSV_COLUMNS])
        count += 1
    return count


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
