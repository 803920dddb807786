from datetime import UTC, datetime, timedelta

import pytest

from meterstream.meters.windows import month_bounds, period_bounds, period_label, window_bounds

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    return (moment - EPOCH) // timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("window", "ts", "expected"),
    [
        ("minute", ms(2024, 5, 1, 10, 30, 15), (ms(2024, 5, 1, 10, 30), ms(2024, 5, 1, 10, 31))),
        ("minute", ms(2024, 5, 1, 10, 30), (ms(2024, 5, 1, 10, 30), ms(2024, 5, 1, 10, 31))),
        ("hour", ms(2024, 5, 1, 10, 59, 59) + 999, (ms(2024, 5, 1, 10), ms(2024, 5, 1, 11))),
        ("hour", ms(2024, 5, 1, 11), (ms(2024, 5, 1, 11), ms(2024, 5, 1, 12))),
        ("day", ms(2024, 2, 29, 23, 59), (ms(2024, 2, 29), ms(2024, 3, 1))),
        ("day", ms(2023, 12, 31, 12), (ms(2023, 12, 31), ms(2024, 1, 1))),
        ("day", 0, (0, 86_400_000)),
        ("minute", -1, (-60_000, 0)),
    ],
)
def test_window_bounds(window: str, ts: int, expected: tuple[int, int]) -> None:
    assert window_bounds(window, ts) == expected
    start, end = expected
    assert start <= ts < end


def test_unknown_window() -> None:
    with pytest.raises(ValueError, match="unknown window 'week'"):
        window_bounds("week", 0)


@pytest.mark.parametrize(
    ("ts", "label", "bounds"),
    [
        (ms(2024, 1, 31, 23, 59, 59) + 999, "2024-01", (ms(2024, 1, 1), ms(2024, 2, 1))),
        (ms(2024, 2, 1), "2024-02", (ms(2024, 2, 1), ms(2024, 3, 1))),
        (ms(2024, 2, 29, 12), "2024-02", (ms(2024, 2, 1), ms(2024, 3, 1))),
        (ms(2023, 2, 28, 23), "2023-02", (ms(2023, 2, 1), ms(2023, 3, 1))),
        (ms(2024, 12, 31, 23, 59), "2024-12", (ms(2024, 12, 1), ms(2025, 1, 1))),
        (ms(2025, 1, 1), "2025-01", (ms(2025, 1, 1), ms(2025, 2, 1))),
        (ms(2024, 4, 30, 23, 59), "2024-04", (ms(2024, 4, 1), ms(2024, 5, 1))),
        (0, "1970-01", (0, ms(1970, 2, 1))),
    ],
)
def test_periods(ts: int, label: str, bounds: tuple[int, int]) -> None:
    assert period_label(ts) == label
    assert period_bounds(ts) == bounds
    assert month_bounds(label) == bounds


def test_leap_february_is_29_days() -> None:
    start, end = month_bounds("2024-02")
    assert (end - start) == 29 * 86_400_000
    start, end = month_bounds("2100-02")  # not a leap year
    assert (end - start) == 28 * 86_400_000


@pytest.mark.parametrize("label", ["2024-13", "2024-00", "2024-1", "24-01", "2024-01-01", ""])
def test_bad_month_label(label: str) -> None:
    with pytest.raises(ValueError, match="not a month label"):
        month_bounds(label)
