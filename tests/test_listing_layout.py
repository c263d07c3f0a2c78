"""How a listing fits a terminal, and how `--status` is read: pure functions, checked in-process."""

from __future__ import annotations

import pytest

from outloop_cli.commands.audit import parse_statuses
from outloop_cli.commands.tables import fit_widths
from outloop_cli.errors import UsageError

GAPS = 2


def total(widths: list[int]) -> int:
    kept = [width for width in widths if width]
    return sum(kept) + GAPS * (len(kept) - 1)


def test_a_table_that_fits_is_left_alone() -> None:
    assert fit_widths([10, 20, 5], fixed={0}, room=100) == [10, 20, 5]


def test_the_rightmost_text_column_is_cut_first_and_fixed_ones_never() -> None:
    widths = fit_widths([11, 8, 40, 4, 30], fixed={0, 1, 3}, room=80)
    assert widths[:2] == [11, 8] and widths[3] == 4
    assert widths[2] == 40 and total(widths) == 80  # the last column gave up what was needed


def test_a_column_that_would_be_a_useless_stub_is_left_out() -> None:
    widths = fit_widths([14, 8, 30, 6, 20, 20], fixed={0, 1, 3}, room=60)
    assert widths[5] == 0 and widths[4] == 0 and total(widths) <= 60
    assert widths[2] >= 3


def test_fixed_columns_wider_than_the_terminal_stay_whole() -> None:
    widths = fit_widths([30, 30, 10], fixed={0, 1}, room=40)
    assert widths == [30, 30, 0]


@pytest.mark.parametrize(("text", "ranges"), [
    ("401", [(401, 401)]), ("5xx", [(500, 599)]), ("4XX", [(400, 499)]),
    ("401, 403,5xx", [(401, 401), (403, 403), (500, 599)]),
])
def test_status_filters_are_codes_or_classes(text: str, ranges: list[tuple[int, int]]) -> None:
    assert parse_statuses(text) == ranges


@pytest.mark.parametrize("text", ["4x", "600", "99", "error", "", "6xx"])
def test_a_bad_status_filter_is_a_usage_error_naming_it(text: str) -> None:
    with pytest.raises(UsageError, match=r"--status: .* is not an HTTP status"):
        parse_statuses(text)
