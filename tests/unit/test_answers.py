"""JSON answers (pipeline/answers.py) and the times a query parameter or a flag gives
(events.parse_time): what the API and the CLI print and read."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from decimal import Decimal

import orjson
import pytest

from meterstream.answers import dumps
from meterstream.events import EPOCH, parse_time


def test_dumps_keeps_decimals_exact_and_times_in_utc() -> None:
    doc = orjson.loads(
        dumps(
            {
                "value": Decimal("0.100000000000000000000000001"),
                "naive": dt.datetime(2026, 9, 1, 12, 30),
                "aware": dt.datetime(2026, 9, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
                "day": dt.date(2026, 9, 1),
                "raw": b"caf\xc3\xa9 \xff",
                "id": uuid.UUID(int=1),
                "ip": ipaddress.ip_address("10.0.0.1"),
            }
        )
    )
    assert doc == {
        "value": "0.100000000000000000000000001",
        "naive": "2026-09-01T12:30:00",  # orjson's own: no offset is invented
        "aware": "2026-09-01T12:30:00+02:00",
        "day": "2026-09-01",
        "raw": "café \ufffd",
        "id": "00000000-0000-0000-0000-000000000001",
        "ip": "10.0.0.1",
    }


def test_parse_time_reads_epoch_ms_and_rfc3339_with_utc_by_default() -> None:
    assert parse_time(None) is None
    assert parse_time("") is None
    assert parse_time("0") == 0
    assert parse_time("1790000000000") == 1_790_000_000_000
    ten_utc = (dt.datetime(2026, 9, 21, 10, tzinfo=dt.UTC) - EPOCH) // dt.timedelta(milliseconds=1)
    assert parse_time("2026-09-21T10:00:00Z") == ten_utc
    assert parse_time("2026-09-21T12:00:00+02:00") == ten_utc
    assert parse_time("2026-09-21T10:00:00") == ten_utc  # no offset: UTC


@pytest.mark.parametrize("bad", ["-1", "yesterday", "2026-13-01T00:00:00Z", "99999999999999999"])
def test_parse_time_refuses_what_is_not_a_usage_time(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_time(bad)
