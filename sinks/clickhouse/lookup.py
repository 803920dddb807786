"""One idempotency key's rows in the record and the dead letters (``meterstream event``).

The reads behind an event's fate (pipeline/api/fate.py decides what they mean): every
``usage_events`` row of one (customer_id, idempotency_key), in the order the record's
deduplicated read takes them (first ingested first; an ``unprocessable`` mark carries the
epoch, so it comes first), and every ``rejected_events`` row of the key, oldest first.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.queries import (
    EVENT_COLUMNS_SQL,
    event_fields,
    latest_windows,
    sql_string,
)

REJECTED_ROWS_LIMIT: Final = 100
"""At most this many dead-letter rows per key are read (a producer that resends one key
a million times gets the oldest hundred and the count)."""


def record_rows_sql(customer_id: str, idempotency_key: str) -> str:
    return (
        f"SELECT {EVENT_COLUMNS_SQL}, meters,"
        " toUnixTimestamp64Milli(ingested_at) AS ingested_at_ms\n"
        "FROM usage_events\n"
        f"WHERE customer_id = {sql_string(customer_id)}"
        f" AND idempotency_key = {sql_string(idempotency_key)}\n"
        "ORDER BY ingested_at"
    )


def rejected_rows_sql(customer_id: str, idempotency_key: str) -> str:
    return (
        "SELECT toUnixTimestamp64Milli(received_at) AS received_at_ms, reason, detail, raw,"
        " meter, count() OVER () AS total\n"
        "FROM rejected_events\n"
        f"WHERE customer_id = {sql_string(customer_id)}"
        f" AND idempotency_key = {sql_string(idempotency_key)}\n"
        f"ORDER BY received_at, reason\nLIMIT {REJECTED_ROWS_LIMIT}"
    )


def record_rows(ch: ClickHouse, customer_id: str, idempotency_key: str) -> list[dict[str, Any]]:
    """The key's record rows; ``event`` holds exactly the UsageEvent fields."""
    return [
        {"event": event_fields(row), "meters": list(row[8]), "ingested_at_ms": int(row[9])}
        for row in ch.query_plain_rows(record_rows_sql(customer_id, idempotency_key))
    ]


def rejected_rows(
    ch: ClickHouse, customer_id: str, idempotency_key: str
) -> tuple[list[dict[str, Any]], int]:
    """The key's dead-letter rows (oldest first, at most REJECTED_ROWS_LIMIT) and how many
    there are in all."""
    rows: list[dict[str, Any]] = []
    total = 0
    for received, reason, detail, raw, meter, count in ch.query_plain_rows(
        rejected_rows_sql(customer_id, idempotency_key)
    ):
        total = int(count)
        rows.append(
            {
                "received_at_ms": int(received),
                "reason": str(reason),
                "detail": detail,
                "raw": raw,
                "meter": meter,
            }
        )
    return rows, total


def window_values(
    ch: ClickHouse, customer_id: str, windows: list[tuple[str, str, int]]
) -> dict[tuple[str, str, int], tuple[Decimal, int]]:
    """The latest value and event count of each (meter, group_key, window_start_ms) of one
    customer in ``meter_windows``; a window not written yet is absent."""
    if not windows:
        return {}
    starts = [start for _, _, start in windows]
    wanted = set(windows)
    found: dict[tuple[str, str, int], tuple[Decimal, int]] = {}
    for row in latest_windows(
        ch, customer_id=customer_id, start_ms=min(starts), end_ms=max(starts) + 1
    ):
        key = (row["meter"], row["group_key"], row["window_start_ms"])
        if key in wanted:
            found[key] = (row["value"], int(row["event_count"]))
    return found


def recent_rejections_sql(customer_id: str, limit: int) -> str:
    return (
        "SELECT toUnixTimestamp64Milli(received_at) AS received_at_ms, reason, detail,"
        " idempotency_key, meter\n"
        "FROM rejected_events\n"
        f"WHERE customer_id = {sql_string(customer_id)} AND reason != 'duplicate'\n"
        f"ORDER BY received_at DESC, reason\nLIMIT {int(limit)}"
    )


def recent_rejections(ch: ClickHouse, customer_id: str, limit: int) -> list[dict[str, Any]]:
    """A customer's newest dead letters (exact resends, counted once, left out), newest first."""
    return [
        {
            "received_at_ms": int(received),
            "reason": str(reason),
            "detail": detail,
            "idempotency_key": key,
            "meter": meter,
        }
        for received, reason, detail, key, meter in ch.query_plain_rows(
            recent_rejections_sql(customer_id, limit)
        )
    ]


def stripe_status_sql(customer_id: str) -> str:
    """The newest state of each of a customer's Stripe meter events (as the ledger reads)."""
    return (
        "SELECT identifier, argMax(meter, version), argMax(period, version),"
        " argMax(value, version), argMax(status, version), argMax(error_code, version),"
        " argMax(attempts, version), toUnixTimestamp64Milli(argMax(sent_at, version)),"
        " toUnixTimestamp64Milli(argMax(updated_at, version))\n"
        "FROM stripe_meter_events\n"
        f"WHERE customer_id = {sql_string(customer_id)}\n"
        "GROUP BY identifier\n"
        "ORDER BY identifier"
    )


def stripe_status(ch: ClickHouse, customer_id: str) -> dict[str, Any]:
    """What reached Stripe for a customer: counts by status, the last accepted send, and
    the sends waiting (pending, or in error until `meterstream stripe retry`)."""
    rows = ch.query_plain_rows(stripe_status_sql(customer_id))
    counts: dict[str, int] = {}
    last_sent = 0
    waiting = []
    for identifier, meter, period, value, status, error_code, attempts, sent, updated in rows:
        counts[status] = counts.get(status, 0) + 1
        if status == "sent":
            last_sent = max(last_sent, int(sent))
        else:
            waiting.append(
                {
                    "identifier": identifier,
                    "meter": meter,
                    "period": period,
                    "value": int(value),
                    "status": status,
                    "error_code": error_code,
                    "attempts": int(attempts),
                    "updated_at_ms": int(updated),
                }
            )
    return {"counts": counts, "last_sent_at_ms": last_sent or None, "waiting": waiting}
