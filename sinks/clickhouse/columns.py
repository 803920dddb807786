"""Rows as one ``JSONCompactColumns`` block: an insert serialized by orjson in C.

clickhouse-connect serializes an insert to its Native format in Python, value by
value, after a ``DESCRIBE`` of the table for every insert: for the worker's batch
of 5,000 usage_events rows that was ~250 ms of the ClickHouse thread, under the
worker's one GIL (measured ~15 ms this way, on chdb). Here the rows become columns,
the few columns whose Python values JSON cannot carry as ClickHouse reads them are
converted, and orjson writes the block: ``[[column 1 values], [column 2 values], ...]``.

What each column type receives, exactly (nothing is rounded here):

- ``DateTime64(p, ...)``: epoch ticks (the integers the row builders write) or an
  aware datetime, as the text ``SSSSSSSSSS.fff``: ten digits of seconds, then
  ``p`` digits. ClickHouse reads a shorter number of seconds as a date
  (``86400.000`` fails), so the seconds are zero-padded; before 1970 or after
  2286-11-20 the rows are :class:`NotEncodable` (the driver's path takes them).
- ``Decimal(P, S)``: the decimal's text (ClickHouse reads ``1E-9`` and ``1.5E+3``
  exactly); a non-finite decimal or a float is not encodable.
- ``Date``: a ``date`` (not a datetime) as ``YYYY-MM-DD``, from 1970-01-01 to
  2149-06-06 (the type's range).
- ``Bool``: ``True``/``False`` as JSON ``true``/``false``.
- ``Nullable(T)`` of any type above: ``None`` as ``null``, anything else as ``T``.
- ``String``, ``LowCardinality(String)``, integers, ``Array(String)``: as they are.

Any other type (``Float``, ``UUID``, ``Array(DateTime64)``, ...), a naive datetime, or
a value orjson refuses raises :class:`NotEncodable`, and the caller inserts those rows
through the driver as before. So this path only ever takes values whose text
ClickHouse reads back equal to what the driver would have written. (The driver's
path also imports pandas the first time it is taken, ~1.6 s of a thread holding the
GIL: in the worker, the first pricing run's ``Date`` column did that until
2026-12-06.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from meterstream.errors import NotEncodable
from meterstream.events import EPOCH

FORMAT = "JSONCompactColumns"

_DATETIME64 = re.compile(r"^DateTime64\((\d)(?:,\s*'[^']*')?\)$")
_DECIMAL = re.compile(r"^Decimal(?:\d+)?\(")
_AS_IS = re.compile(
    r"^(String|LowCardinality\(String\)|U?Int(8|16|32|64)|Array\(String\)"
    r"|Array\(LowCardinality\(String\)\))$"
)
_MAX_SECONDS = 9_999_999_999  # ten digits: 2286-11-20
_NULLABLE = re.compile(r"^Nullable\((.+)\)$")
_DATE_RANGE = (date(1970, 1, 1), date(2149, 6, 6))  # ClickHouse's Date


def _datetime64(precision: int) -> Callable[[Sequence[Any]], list[str]]:
    scale = 10**precision
    tick = timedelta(microseconds=10 ** (6 - precision)) if precision <= 6 else None

    def text(value: Any) -> str:
        if type(value) is int:
            ticks = value
        elif isinstance(value, datetime) and value.tzinfo is not None and tick is not None:
            ticks = (value - EPOCH) // tick
        else:
            raise NotEncodable(f"{type(value).__name__} for a DateTime64({precision}) column")
        seconds, fraction = divmod(ticks, scale)
        if not 0 <= seconds <= _MAX_SECONDS:
            raise NotEncodable(f"{ticks} ticks is outside 1970 .. 2286")
        return f"{seconds:010d}.{fraction:0{precision}d}"

    return _by_distinct(text)


def _decimal(value: Any) -> Any:
    if type(value) is int:
        return value
    if isinstance(value, Decimal) and value.is_finite():
        return str(value)
    raise NotEncodable(f"{value!r} for a Decimal column")


def _by_distinct(convert: Callable[[Any], Any]) -> Callable[[Sequence[Any]], list[Any]]:
    """A column converter that converts each distinct value once: a batch's rows share
    a few window bounds and one receive time (~4x faster on the worker's windows)."""

    def column(values: Sequence[Any]) -> list[Any]:
        try:
            converted = {value: convert(value) for value in dict.fromkeys(values)}
        except TypeError as exc:  # unhashable: not a value of this column
            raise NotEncodable(str(exc)) from exc
        return [converted[value] for value in values]

    return column


_decimal_column = _by_distinct(_decimal)


def _date(value: Any) -> str:
    if type(value) is not date:  # a datetime is a date too: its zone would be guessed
        raise NotEncodable(f"{type(value).__name__} for a Date column")
    if not _DATE_RANGE[0] <= value <= _DATE_RANGE[1]:
        raise NotEncodable(f"{value} is outside ClickHouse's Date range")
    return value.isoformat()


def _bool(values: Sequence[Any]) -> Sequence[Any]:
    for value in values:
        if type(value) is not bool:
            raise NotEncodable(f"{type(value).__name__} for a Bool column")
    return values


_date_column = _by_distinct(_date)


def _nullable(inner: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
    def column(values: Sequence[Any]) -> list[Any]:
        present = iter(inner([value for value in values if value is not None]))
        return [None if value is None else next(present) for value in values]

    return column


def column_encoder(column_type: str) -> Callable[[Sequence[Any]], Any] | None:
    """How a column of ``column_type`` is written (None: as it is); NotEncodable if never."""
    if match := _NULLABLE.match(column_type):
        inner = column_encoder(match.group(1))
        return None if inner is None else _nullable(inner)  # None is JSON's null as it is
    if column_type == "Date":
        return _date_column
    if column_type == "Bool":
        return _bool
    if match := _DATETIME64.match(column_type):
        return _datetime64(int(match.group(1)))
    if _DECIMAL.match(column_type):
        return _decimal_column
    if _AS_IS.match(column_type):
        return None
    raise NotEncodable(f"column type {column_type} is not written as JSON here")


def encode(
    rows: Sequence[Sequence[Any]],
    column_names: Sequence[str],
    column_types: Mapping[str, str],
) -> bytes:
    """The ``JSONCompactColumns`` block of ``rows`` (values in ``column_names`` order)."""
    missing = [name for name in column_names if name not in column_types]
    if missing:
        raise NotEncodable(f"unknown columns {missing}")
    columns: list[Any] = [list(c) for c in zip(*rows, strict=True)] if rows else []
    if len(columns) != len(column_names):
        raise NotEncodable(f"{len(columns)} values per row for {len(column_names)} columns")
    for i, name in enumerate(column_names):
        encoder = column_encoder(column_types[name])
        if encoder is not None:
            columns[i] = encoder(columns[i])
    try:
        return orjson.dumps(columns)
    except TypeError as exc:  # orjson.JSONEncodeError: a value JSON cannot carry
        raise NotEncodable(str(exc)) from exc
