"""Tables and key/value blocks for the operator commands: a rich table on a terminal, aligned text elsewhere.

Plain output has no colour, no box drawing and one record per line, so `grep`, `awk` and cron mail read it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from outloop_cli.commands.output import console, wants_plain


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = (),
                whole: Sequence[str] = ()) -> None:
    """`right` names the numeric columns, aligned right in both forms; on a narrow terminal the other columns
    are cut short with an ellipsis, except those named in `whole` (ids people copy), which are never shortened."""
    cells = [[_text(value) for value in row] for row in rows]
    if wants_plain(sys.stdout):
        widths = [max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
        for line in ([*columns], *cells):
            parts = [cell.rjust(width) if column in right else cell.ljust(width)
                     for column, cell, width in zip(columns, line, widths, strict=True)]
            sys.stdout.write("  ".join(parts).rstrip() + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for index, column in enumerate(columns):
        widest = max([len(column), *(len(row[index]) for row in cells)])
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True,
                         overflow="ellipsis", min_width=widest if column in whole else None)
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))  # Text, not markup: values come from loops and profiles
    console().print(table)


def print_pairs(pairs: Sequence[tuple[str, object]], *, indent: int = 0) -> None:
    """`key  value` lines, keys aligned."""
    width = max((len(key) for key, _ in pairs), default=0)
    for key, value in pairs:
        sys.stdout.write(f"{' ' * indent}{key.ljust(width)}  {_text(value)}\n")


def note(message: str) -> None:
    """A line for the operator on stderr, so stdout stays parseable."""
    sys.stderr.write(message + "\n")


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
