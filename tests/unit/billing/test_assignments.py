"""Plan schedules: effective dates, changes, and the customer-plans topic's records."""

from __future__ import annotations

import pytest

from meterstream.billing.assignments import (
    BadSchedule,
    decode_schedule,
    encode_schedule,
    iso,
    parse_instant,
    with_assignment,
    without_assignment,
)

DEC_1 = 1_796_083_200_000  # 2026-12-01T00:00:00Z


def test_effective_dates() -> None:
    assert parse_instant("2026-12-01") == DEC_1
    assert parse_instant("2026-12-01T00:00:00Z") == DEC_1
    assert parse_instant("2026-12-01T01:00:00+01:00") == DEC_1
    assert parse_instant("2026-12-01T00:00:00.250Z") == DEC_1 + 250
    assert iso(DEC_1 + 250) == "2026-12-01T00:00:00.250Z"
    for bad in ("", "2026-13-01", "2026-12-01T00:00:00", "yesterday", None, 5, "1969-12-31",
                "2026-12-01T00:00:00.0001Z"):  # fmt: skip
        with pytest.raises(BadSchedule):
            parse_instant(bad)


def test_a_change_at_the_same_instant_replaces_and_the_schedule_stays_ordered() -> None:
    schedule = with_assignment((), "pro", DEC_1 + 10)
    schedule = with_assignment(schedule, "basic", DEC_1)
    assert schedule == (("basic", DEC_1), ("pro", DEC_1 + 10))
    assert with_assignment(schedule, "free", DEC_1) == (("free", DEC_1), ("pro", DEC_1 + 10))
    assert without_assignment(schedule, DEC_1) == (("pro", DEC_1 + 10),)
    with pytest.raises(BadSchedule, match="no plan takes effect"):
        without_assignment(schedule, DEC_1 + 5)


def test_topic_records_round_trip_and_bad_ones_are_refused() -> None:
    schedule = (("basic", DEC_1), ("pro", DEC_1 + 3_600_000))
    value = encode_schedule(schedule)
    assert value is not None
    assert decode_schedule(b"acme", value) == ("acme", schedule)
    assert decode_schedule(b"acme", value, {"basic", "pro"}) == ("acme", schedule)
    assert encode_schedule(()) is None
    assert decode_schedule(b"acme", None) == ("acme", ())  # a tombstone: no plan
    refused = [
        (b"", value),
        (b"\xff", value),
        (b"acme", b"not json"),
        (b"acme", b"[]"),
        (b"acme", b'{"plans": [{"plan": "Pro!", "from": "2026-12-01"}]}'),
        (b"acme", b'{"plans": [{"plan": "pro"}]}'),
        (b"acme", b'{"plans": ["pro"]}'),
    ]
    for key, bad in refused:
        with pytest.raises(BadSchedule):
            decode_schedule(key, bad)
    with pytest.raises(BadSchedule, match="no plan named 'pro'"):
        decode_schedule(b"acme", value, {"basic"})
