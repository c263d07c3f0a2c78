"""Tables and key/value blocks for the operator commands: a rich table on a terminal, aligned text elsewhere.

Plain output has no colour, no box drawing and one record per line, so `grep`, `awk` and cron mail read it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from outloop_cli.commands.output import console, wants_plain


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = (),
                whole: Sequence[str] = ()) -> None:
    """`right` names the numeric columns, aligned right in both forms.

    On a terminal narrower than the table, the text columns are cut short with an ellipsis, rightmost first (so
    put the text that matters most to the left), and left out where even a stub would not fit. Numbers and the
    columns named in `whole` (ids, times, states people read or copy) are never shortened: when they alone are
    too wide, the terminal wraps the lines. Plain output is never cut: it is for grep and mail.
    """
    cells = [[_text(value) for value in row] for row in rows]
    widths = [max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    if wants_plain(sys.stdout):
        for line in ([*columns], *cells):
            parts = [cell.rjust(width) if column in right else cell.ljust(width)
                     for column, cell, width in zip(columns, line, widths, strict=True)]
            sys.stdout.write("  ".join(parts).rstrip() + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    out = console()
    fixed = {index for index, column in enumerate(columns) if column in right or column in whole}
    widths = fit_widths(widths, fixed, out.width)
    kept = [index for index, width in enumerate(widths) if width]
    out.width = max(out.width, sum(widths) + _GAP * (len(kept) - 1))  # rich would shrink every column instead
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=False)
    for index in kept:
        table.add_column(columns[index], justify="right" if columns[index] in right else "left", no_wrap=True,
                         overflow="ellipsis", width=widths[index])
    for row in cells:
        table.add_row(*(Text(row[index]) for index in kept))  # Text, not markup: values come from loops and profiles
    out.print(table)


_GAP = 2  # rich's default padding: one space each side of a column
_MIN_CUT = 3  # a cut column keeps at least "ab…"


def fit_widths(widths: Sequence[int], fixed: set[int], room: int) -> list[int]:
    """Column widths for a table `room` characters wide, gaps included, where possible: cuttable columns, rightmost
    first, shrink to _MIN_CUT characters, or are left out (width 0) when that is not enough; fixed columns never
    lose a character."""
    result = list(widths)

    def excess() -> int:
        kept = [width for width in result if width]
        return sum(kept) + _GAP * (len(kept) - 1) - room

    cuttable = [index for index in reversed(range(len(result))) if index not in fixed]
    for index in cuttable:
        if excess() <= 0:
            return result
        if excess() <= result[index] - _MIN_CUT:
            result[index] -= excess()
            return result
        result[index] = 0  # a stub of a few characters says nothing: better left out, letting the rest show
    return result


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
