"""UTC tumbling windows and calendar-month billing periods, in epoch milliseconds.

Every bound is a half-open interval ``[start_ms, end_ms)``: an event at exactly
``end_ms`` belongs to the next window. Times before 1970 work too (floor
division), though the pipeline never produces them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from meterstream.events import EPOCH

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WINDOW_MS: dict[str, int] = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}

_LABEL = re.compile(r"(\d{4})-(\d{2})")


def window_bounds(window: str, ts_ms: int) -> tuple[int, int]:
    """The UTC ``minute`` / ``hour`` / ``day`` window holding ``ts_ms``."""
    try:
        size = WINDOW_MS[window]
    except KeyError:
        raise ValueError(f"unknown window {window!r}: use one of {', '.join(WINDOW_MS)}") from None
    start = ts_ms - ts_ms % size
    return start, start + size


def day_of(ts_ms: int) -> int:
    """The start of the UTC day holding ``ts_ms``."""
    return ts_ms - ts_ms % DAY_MS


def _month_start_ms(year: int, month: int) -> int:
    return (datetime(year, month, 1, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


def _year_month(ts_ms: int) -> tuple[int, int]:
    moment = EPOCH + timedelta(milliseconds=ts_ms)
    return moment.year, moment.month


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def period_bounds(ts_ms: int) -> tuple[int, int]:
    """The UTC calendar month (the billing period) holding ``ts_ms``."""
    year, month = _year_month(ts_ms)
    return _month_start_ms(year, month), _month_start_ms(*_next_month(year, month))


def period_label(ts_ms: int) -> str:
    """``"YYYY-MM"`` of the UTC calendar month holding ``ts_ms``."""
    year, month = _year_month(ts_ms)
    return f"{year:04d}-{month:02d}"


def month_bounds(label: str) -> tuple[int, int]:
    """Bounds of the month named ``"YYYY-MM"``; raises ``ValueError`` for anything else."""
    match = _LABEL.fullmatch(label)
    if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
        raise ValueError(f"{label!r} is not a month label (YYYY-MM)")
    year, month = int(match[1]), int(match[2])
    return _month_start_ms(year, month), _month_start_ms(*_next_month(year, month))
