"""The JSONCompactColumns block of an insert (meterstream.sinks.clickhouse.columns): pure
encoding."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest

from meterstream.errors import NotEncodable
from meterstream.sinks.clickhouse.columns import encode

TYPES = {
    "key": "String",
    "name": "LowCardinality(String)",
    "ts": "DateTime64(3, 'UTC')",
    "value": "Decimal(38, 9)",
    "count": "UInt64",
    "tags": "Array(String)",
}
NAMES = list(TYPES)


def decoded(rows: list[tuple[object, ...]], names: list[str] = NAMES) -> list[list[object]]:
    return orjson.loads(encode(rows, names, TYPES))


def test_rows_become_columns_with_datetime64_and_decimal_text() -> None:
    rows = [
        ("k1", "api", 1_700_000_000_123, Decimal("1.10"), 3, ["a", "b"]),
        ('k"2\n\u2028é', "api", 0, Decimal("1E-9"), 0, []),
    ]
    assert decoded(rows) == [
        ["k1", 'k"2\n\u2028é'],
        ["api", "api"],
        ["1700000000.123", "0000000000.000"],  # ten digits of seconds: 86.4 would be a date
        ["1.10", "1E-9"],
        [3, 0],
        [["a", "b"], []],
    ]


def test_aware_datetimes_are_exact_ticks_in_any_zone() -> None:
    paris = timezone(timedelta(hours=1))
    rows = [
        ("a", "n", datetime(2024, 1, 31, 22, 0, 0, 123_999, tzinfo=UTC), 1, 1, []),
        ("b", "n", datetime(2024, 1, 31, 23, 0, 0, 5_000, tzinfo=paris), 1, 1, []),
    ]
    assert decoded(rows)[2] == ["1706738400.123", "1706738400.005"]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("ts", -1),  # before 1970: ClickHouse reads no sign in this form
        ("ts", 10_000_000_000_000),  # after 2286-11-20: eleven digits of seconds
        ("ts", datetime(2024, 1, 1)),  # naive: the driver's path decides its zone
        ("ts", "2024-01-01"),
        ("ts", True),
        ("ts", [1]),  # unhashable
        ("value", Decimal("NaN")),
        ("value", Decimal("Infinity")),
        ("value", 1.5),  # a float is never money
        ("tags", {"a"}),  # orjson refuses a set
    ],
)
def test_values_json_cannot_carry_exactly_are_refused(column: str, value: object) -> None:
    row = {"key": "k", "name": "n", "ts": 0, "value": Decimal(1), "count": 1, "tags": []}
    row[column] = value
    with pytest.raises(NotEncodable):
        encode([tuple(row.values())], NAMES, TYPES)


def test_unknown_columns_types_and_ragged_rows_are_refused() -> None:
    with pytest.raises(NotEncodable, match="unknown columns"):
        encode([("k",)], ["nope"], TYPES)
    with pytest.raises(NotEncodable, match="Float64"):
        encode([(1.5,)], ["f"], {"f": "Float64"})
    with pytest.raises(NotEncodable, match="Float64"):
        encode([(None,)], ["f"], {"f": "Nullable(Float64)"})
    with pytest.raises(NotEncodable, match="Array"):
        encode([([],)], ["a"], {"a": "Array(DateTime64(3, 'UTC'))"})
    with pytest.raises(ValueError):
        encode([("k", "n"), ("k",)], ["key", "name"], TYPES)


def test_integers_in_decimal_columns_stay_integers() -> None:
    assert decoded([("k", "n", 5, 7, 1, [])])[3] == [7]


def test_dates_bools_and_nullables() -> None:
    types = {
        "day": "Date",
        "on": "Bool",
        "expires": "Nullable(DateTime64(3, 'UTC'))",
        "n": "Nullable(Int64)",
        "s": "Nullable(String)",
    }
    rows = [
        (date(2026, 12, 1), True, None, -5, None),
        (date(1970, 1, 1), False, 1_700_000_000_123, None, "x"),
        (date(2149, 6, 6), True, datetime(2024, 1, 31, 22, tzinfo=UTC), None, None),
    ]
    assert orjson.loads(encode(rows, list(types), types)) == [
        ["2026-12-01", "1970-01-01", "2149-06-06"],
        [True, False, True],
        [None, "1700000000.123", "1706738400.000"],
        [-5, None, None],
        [None, "x", None],
    ]


@pytest.mark.parametrize(
    ("column_type", "value"),
    [
        ("Date", datetime(2026, 12, 1, tzinfo=UTC)),  # a datetime: which day is a guess
        ("Date", "2026-12-01"),
        ("Date", date(1969, 12, 31)),  # outside the type's range
        ("Date", date(2149, 6, 7)),
        ("Bool", 1),
        ("Bool", "true"),
        ("Nullable(DateTime64(3, 'UTC'))", -1),  # the inner type's refusals hold
        ("Nullable(Date)", date(1969, 12, 31)),
    ],
)
def test_dates_and_bools_json_cannot_carry_exactly_are_refused(
    column_type: str, value: object
) -> None:
    with pytest.raises(NotEncodable):
        encode([(value,)], ["c"], {"c": column_type})
