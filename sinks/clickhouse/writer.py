"""Write side of ClickHouse: pure row builders and the insert token of one call.

Row builders turn pipeline objects into tuples in the column order of the
``*_COLUMNS`` constants. The hot rows (usage_events, meter_windows) write their
DateTime64(3, 'UTC') columns as integer epoch milliseconds, the column's own
ticks: exact, free of any time zone, and no per-value datetime conversion in
the driver (which was ~11% of the ClickHouse thread). Other rows write
timezone-aware (UTC) datetimes: a naive datetime written to chdb is read as
process-local time (measured).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any, Protocol

from meterstream.events import ALL_METERS, EPOCH, Rejection, UsageEvent, content_fingerprint

USAGE_EVENTS = "usage_events"
METER_WINDOWS = "meter_windows"
REJECTED_EVENTS = "rejected_events"
STRIPE_METER_EVENTS = "stripe_meter_events"

USAGE_EVENTS_COLUMNS: tuple[str, ...] = (
    "idempotency_key",
    "customer_id",
    "event_name",
    "timestamp",
    "properties",
    "fingerprint",
    "key_derived",
    "ingested_at",
    "meters",
    "refused_meters",
)
METER_WINDOWS_COLUMNS: tuple[str, ...] = (
    "meter",
    "aggregation",
    "customer_id",
    "group_key",
    "window_start",
    "window_end",
    "value",
    "event_count",
    "distinct_values",
    "latest_ts",
    "latest_key",
    "version",
    "updated_at",
)
REJECTED_EVENTS_COLUMNS: tuple[str, ...] = (
    "received_at",
    "reason",
    "detail",
    "raw",
    "customer_id",
    "idempotency_key",
    "meter",
)
STRIPE_METER_EVENTS_COLUMNS: tuple[str, ...] = (
    "identifier",
    "meter",
    "customer_id",
    "stripe_customer_id",
    "period",
    "value",
    "exact_total",
    "status",
    "error_code",
    "attempts",
    "sent_at",
    "updated_at",
    "version",
    "timestamp_s",
)
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    USAGE_EVENTS: USAGE_EVENTS_COLUMNS,
    METER_WINDOWS: METER_WINDOWS_COLUMNS,
    REJECTED_EVENTS: REJECTED_EVENTS_COLUMNS,
    STRIPE_METER_EVENTS: STRIPE_METER_EVENTS_COLUMNS,
}

_SCALE = Decimal("1e-9")
_DECIMAL_38_9_LIMIT = Decimal(10) ** 29  # 38 digits, 9 of them after the point
_CONTEXT = Context(prec=80)


class WindowStateLike(Protocol):
    """What ``meter_window_row`` reads from meterstream.meters.aggregation.WindowState."""

    event_count: int
    distinct: set[str] | None
    latest_ts: int
    latest_key: str


def utc_datetime(epoch_ms: int) -> datetime:
    """Exact aware UTC datetime from epoch milliseconds (no float rounding)."""
    return EPOCH + timedelta(milliseconds=int(epoch_ms))


def decimal_38_9(value: Decimal) -> Decimal:
    """``value`` rounded half-even to 9 places, as stored in Decimal(38, 9).

    The driver would silently truncate extra places; rounding here makes the
    stored value explicit and testable. Raises ValueError beyond the type's range.
    """
    try:
        quantized = Decimal(value).quantize(_SCALE, rounding=ROUND_HALF_EVEN, context=_CONTEXT)
    except InvalidOperation:
        raise ValueError(f"{value} does not fit Decimal(38, 9)") from None
    if not quantized.is_finite() or quantized.copy_abs() >= _DECIMAL_38_9_LIMIT:
        raise ValueError(f"{value} does not fit Decimal(38, 9)")
    return quantized


def usage_event_row(
    event: UsageEvent,
    ingested_at_ms: int,
    meters: Sequence[str] = (),
    refused: Sequence[str] = (),
) -> tuple[Any, ...]:
    """A usage_events row (USAGE_EVENTS_COLUMNS order); ``meters`` counted the event,
    ``refused`` refused it for range (``["*"]``: set aside as unprocessable, see
    migrations/0007).

    Pass the Kafka record timestamp as ``ingested_at_ms`` rather than the wall
    clock: a batch rebuilt after a crash is then byte-identical and its
    deduplication token matches.
    """
    properties = event.canonical_properties()
    fingerprint = event.fingerprint or content_fingerprint(
        event.event_name, event.timestamp_ms, event.properties, properties
    )
    return (
        event.idempotency_key,
        event.customer_id,
        event.event_name,
        int(event.timestamp_ms),
        properties,
        fingerprint,
        1 if event.key_derived else 0,
        int(ingested_at_ms),
        sorted(meters),
        sorted(refused),
    )


UNPROCESSABLE_INGESTED_AT_MS = 0
"""``ingested_at`` of the row that marks a key unprocessable (``refused_meters = ['*']``):
the epoch, so that every read of the record, which keeps the first ingested row of a
key (``LIMIT 1 BY`` after ``ORDER BY ... ingested_at``), keeps the mark."""


def unprocessable_row(event: UsageEvent) -> tuple[Any, ...]:
    """The usage_events row that marks ``event`` as set aside: counted by no meter."""
    return usage_event_row(event, UNPROCESSABLE_INGESTED_AT_MS, (), (ALL_METERS,))


def usage_event_rows(
    events: Sequence[UsageEvent],
    ingested_at_ms: int,
    counted_by: Mapping[Any, Sequence[str]],
    refused: Mapping[Any, Sequence[str]],
) -> tuple[list[tuple[Any, ...]], tuple[str, ...]]:
    """Rows and columns of one usage_events insert; ``counted_by`` and ``refused`` by
    (customer_id, idempotency_key). ``refused_meters`` is left out (its default ``[]``
    applies) when no event was refused: the common case, one column less to parse."""
    if refused:
        rows = []
        for ev in events:
            key = (ev.customer_id, ev.idempotency_key)
            rows.append(usage_event_row(ev, ingested_at_ms, counted_by[key], refused.get(key, ())))
        return rows, USAGE_EVENTS_COLUMNS
    rows = [
        usage_event_row(ev, ingested_at_ms, counted_by[(ev.customer_id, ev.idempotency_key)])[:-1]
        for ev in events
    ]
    return rows, USAGE_EVENTS_COLUMNS[:-1]


def rejected_row(rejection: Rejection, received_at_ms: int) -> tuple[Any, ...]:
    """A rejected_events row (REJECTED_EVENTS_COLUMNS order)."""
    return (
        utc_datetime(received_at_ms),
        str(rejection.reason),
        rejection.detail,
        rejection.raw.decode("utf-8", errors="replace"),
        rejection.customer_id,
        rejection.idempotency_key,
        rejection.meter,
    )


def meter_window_row(
    meter_name: str,
    aggregation: str,
    customer_id: str,
    group_key: str,
    window_start_ms: int,
    window_end_ms: int,
    state: WindowStateLike,
    version: int,
    updated_at_ms: int,
    *,
    value: Decimal,
    sorted_distinct: list[str] | None = None,
) -> tuple[Any, ...]:
    """A meter_windows row (METER_WINDOWS_COLUMNS order).

    ``value`` is the window result computed by the caller (keyword-only, so it
    is never confused with a state field). ``distinct_values`` is written for
    unique_count only (sorted, so equal sets give equal rows) and
    ``latest_ts``/``latest_key`` for latest only; other aggregations write
    ``[]``, epoch 0 and ``''``. ``sorted_distinct`` is ``sorted(state.distinct)``
    when the caller has it already (``Aggregator.dump`` sorts too).
    """
    distinct: list[str] = []
    if aggregation == "unique_count" and state.distinct:
        distinct = sorted(state.distinct) if sorted_distinct is None else sorted_distinct
    is_latest = aggregation == "latest"
    return (
        meter_name,
        aggregation,
        customer_id,
        group_key,
        int(window_start_ms),
        int(window_end_ms),
        decimal_38_9(value),
        int(state.event_count),
        distinct,
        int(state.latest_ts) if is_latest else 0,
        state.latest_key if is_latest else "",
        int(version),
        int(updated_at_ms),
    )


def call_token(table: str, rows: Sequence[Sequence[Any]]) -> str:
    """A fresh ``insert_deduplication_token`` for one insert call, kept by its retries.

    For the worker's inserts, whose rows carry the batch's receive time: a replayed
    batch never repeats them (the tables' keys, not the token, absorb the replay),
    so the token only has to make a retry of this one call a no-op. Hashing the
    rows instead cost ~4% of the worker's time for nothing more.
    """
    return f"{table}-{len(rows)}-{uuid.uuid4().hex}"
