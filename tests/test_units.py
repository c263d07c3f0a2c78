"""Spec for outloop_cli.units: the durations, rates and sizes written in profiles and flags."""

from __future__ import annotations

import pytest

from outloop_cli.units import Rate, format_bytes, format_duration, parse_duration, parse_rate, parse_size

# ----- parse_duration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5),
    ("90s", 90.0),
    ("15m", 900.0),
    ("2h", 7200.0),
    ("7d", 604800.0),
    ("1w", 604800.0),
    ("1h30m", 5400.0),
    ("1d2h3m4s", 93784.0),
    ("1.5h", 5400.0),
    ("0.5s", 0.5),
    (" 2h ", 7200.0),
    ("1h 30m", 5400.0),
    ("45", 45.0),
    ("2.5", 2.5),
    (30, 30.0),
    (0.25, 0.25),
])
def test_parse_duration_accepts_units_compounds_and_bare_seconds(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "h", "abc", "10x", "1h30", "10 parsecs", "-5s", "1e3s", "s10", "1,5h",
                                  "1h-30m", "PT1H"])
def test_parse_duration_rejects_text_without_a_known_unit(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration.*ms, s, m, h, d or w"):
        parse_duration(text)


@pytest.mark.parametrize("value", [0, 0.0, "0s", "0", "0h0m", -1, -0.5])
def test_parse_duration_rejects_zero_and_negative(value: str | int | float) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_duration(value)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_parse_duration_rejects_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="finite number greater than zero"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False, None, [1], {"h": 1}])
def test_parse_duration_rejects_other_types_with_examples(value: object) -> None:
    with pytest.raises(ValueError, match=r"expected a duration such as \"30s\""):
        parse_duration(value)  # type: ignore[arg-type]


# ----- parse_rate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "count", "per_seconds"), [
    ("10/s", 10, 1.0),
    ("10/sec", 10, 1.0),
    ("10/second", 10, 1.0),
    ("600/min", 600, 60.0),
    ("600/m", 600, 60.0),
    ("600/minute", 600, 60.0),
    ("5000/h", 5000, 3600.0),
    ("5000/hour", 5000, 3600.0),
    ("5/10s", 5, 10.0),
    ("3/2min", 3, 120.0),
    (" 10 / s ", 10, 1.0),
])
def test_parse_rate_reads_count_per_period(text: str, count: int, per_seconds: float) -> None:
    assert parse_rate(text) == Rate(count=count, per_seconds=per_seconds)


@pytest.mark.parametrize("text", ["", "10", "10/", "/s", "10/d", "10/seconds", "ten/s", "1.5/s", "-1/s", "10/s/s",
                                  "10 per s"])
def test_parse_rate_rejects_malformed_text_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a rate; write COUNT/UNIT such as \"10/s\""):
        parse_rate(text)


@pytest.mark.parametrize("text", ["0/s", "5/0s", "0/0min"])
def test_parse_rate_rejects_zero_count_or_period(text: str) -> None:
    with pytest.raises(ValueError, match="at least one request per period"):
        parse_rate(text)


@pytest.mark.parametrize("value", [10, 1.5, True, None, ["10/s"]])
def test_parse_rate_rejects_non_strings_with_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rate", "per_second", "text"), [
    (Rate(10, 1.0), 10.0, "10/1s"),
    (Rate(600, 60.0), 10.0, "600/60s"),
    (Rate(5, 10.0), 0.5, "5/10s"),
])
def test_rate_reports_per_second_and_prints_compactly(rate: Rate, per_second: float, text: str) -> None:
    assert rate.per_second == per_second
    assert str(rate) == text


# ----- parse_size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("1", 1),
    ("512", 512),
    ("10B", 10),
    ("1K", 1024),
    ("1k", 1024),
    ("512M", 512 * 1024**2),
    ("2G", 2 * 1024**3),
    ("1T", 1024**4),
    ("1GiB", 1024**3),
    ("1GB", 1024**3),
    ("1gb", 1024**3),
    ("512 M", 512 * 1024**2),
    (" 64K ", 64 * 1024),
    (4096, 4096),
])
def test_parse_size_reads_binary_units_and_bare_bytes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "1P", "1 GiB extra", "lots", "1e6"])
def test_parse_size_rejects_malformed_text_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size; write a number with K, M, G or T"):
        parse_size(text)


@pytest.mark.parametrize("value", [0, "0", "0M", -5])
def test_parse_size_rejects_zero_and_negative(value: str | int) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, 1.5, None, ["1M"]])
def test_parse_size_rejects_other_types_with_examples(value: object) -> None:
    with pytest.raises(ValueError, match=r"expected a size such as \"512M\""):
        parse_size(value)  # type: ignore[arg-type]


# ----- formatting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0ms"),
    (0.0042, "4ms"),
    (0.5, "500ms"),
    (1.0, "1.0s"),
    (1.24, "1.2s"),
    (59.0, "59.0s"),
    (60.0, "1m00s"),
    (185.0, "3m05s"),
    (3599.0, "59m59s"),
    (3600.0, "1h00m"),
    (7800.0, "2h10m"),
    (90000.0, "25h00m"),
])
def test_format_duration_is_short_and_human(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("count", "text"), [
    (0, "0B"),
    (1, "1B"),
    (1023, "1023B"),
    (1024, "1.0KiB"),
    (1536, "1.5KiB"),
    (5 * 1024**2, "5.0MiB"),
    (3 * 1024**3, "3.0GiB"),
    (2048 * 1024**3, "2048.0GiB"),
])
def test_format_bytes_uses_binary_units_up_to_gib(count: int, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize("seconds", [0.5, 30.0, 185.0, 5400.0, 604800.0])
def test_format_duration_output_parses_back_to_the_same_duration(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
