"""ClickHouse side of prices (migration 0009): plan schedules, segment quantities, and the
analysts' priced usage. Plain reads and appends; the pricing is pipeline/pricing/.
"""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.sinks.clickhouse.changes import Change, latest_rows, next_version
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.queries import (
    MERGED_VALUE_SQL,
    _key_filters,
    customer_chunks,
    latest_windows,
    latest_windows_sql,
    sql_ms,
)

CUSTOMER_PLANS = "customer_plans"
CUSTOMER_PLANS_COLUMNS = (
    "customer_id",
    "plans",
    "effective_from",
    "origin",
    "changed_by",
    "changed_at",
    "version",
)
PRICED_USAGE_RUNS = "priced_usage_runs"
PRICED_USAGE_COLUMNS = (
    "customer_id",
    "period_start",
    "run",
    "day",
    "meter",
    "plan",
    "segment_start",
    "currency",
    "quantity",
    "period_to_date",
    "amount",
)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dt(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def _iso(ms: int) -> str:
    return _dt(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(value: Any) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return (value - _EPOCH) // dt.timedelta(milliseconds=1)
    return int(value)


# ------------------------------------------------------------------ quantities


def segment_quantities_sql(customer_id: str, start_ms: int, end_ms: int) -> str:
    """Per meter, the customer's value over windows starting in ``[start_ms, end_ms)``,
    all groups merged (sum/count add, max/min, unique_count = size of the union, latest
    = the latest of latests): the same merge as the usage API and the views."""
    where = _key_filters(None, customer_id, start_ms, end_ms)
    inner = textwrap.indent(latest_windows_sql(where), "    ")
    return (
        f"SELECT meter, aggregation, {MERGED_VALUE_SQL} AS value\n"
        f"FROM\n(\n{inner}\n)\nGROUP BY meter, aggregation\nORDER BY meter"
    )


def segment_quantities(
    ch: ClickHouse, customer_id: str, start_ms: int, end_ms: int
) -> dict[str, Decimal]:
    """``{meter: value}`` of :func:`segment_quantities_sql` (meters without windows absent)."""
    rows = ch.query_rows(segment_quantities_sql(customer_id, start_ms, end_ms))
    return {str(meter): Decimal(value) for meter, _, value in rows}


def customers_with_windows(ch: ClickHouse, start_ms: int, end_ms: int) -> list[str]:
    """Customers with a window starting in ``[start_ms, end_ms)``, sorted."""
    rows = ch.query_rows(
        "SELECT DISTINCT customer_id FROM meter_windows"
        f" WHERE window_start >= {sql_ms(start_ms)} AND window_start < {sql_ms(end_ms)}"
        " ORDER BY customer_id"
    )
    return [str(r[0]) for r in rows]


# ------------------------------------------------------------------ plan schedules


@dataclass(frozen=True)
class ScheduleRow(Change):
    """One change of a customer's plan schedule: ``(plan, effective epoch ms)`` ascending."""

    schedule: tuple[tuple[str, int], ...]

    def public(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "plans": [{"plan": plan, "from": _iso(ms)} for plan, ms in self.schedule],
            **self.provenance(_iso(self.changed_at_ms)),
        }


def _schedule_row(r: Sequence[Any]) -> ScheduleRow:
    schedule = tuple((str(p), _ms(e)) for p, e in zip(r[1], r[2], strict=True))
    return ScheduleRow(str(r[0]), str(r[3]), str(r[4]), _ms(r[5]), int(r[6]), schedule)


_CURRENT = """
SELECT customer_id, argMax(plans, version), argMax(effective_from, version),
       argMax(origin, version), argMax(changed_by, version), argMax(changed_at, version),
       max(version)
FROM customer_plans
{where}
GROUP BY customer_id
ORDER BY customer_id
"""


def current_schedules(
    ch: ClickHouse, customers: Iterable[str] | None = None
) -> dict[str, ScheduleRow]:
    """The latest schedule per customer (empty ones included), of ``customers`` or all."""
    rows = latest_rows(ch, _CURRENT, customers)
    return {str(r[0]): _schedule_row(r) for r in rows}


def schedules_and_windows(
    ch: ClickHouse, customers: Sequence[str], start_ms: int, end_ms: int
) -> tuple[dict[str, ScheduleRow], dict[str, list[dict[str, Any]]]]:
    """What pricing ``customers`` in [start_ms, end_ms) reads, in two reads however many
    they are: their latest schedules, and the range's latest windows of all of them (in
    slices that keep each query under max_query_size, :func:`customer_chunks`), grouped
    by customer (each of ``customers`` there, with no windows if none). A pricing run and
    a credit burn read this way: one read per customer made a run of 1,000 customers
    25-28 s of a thread taking the GIL thousands of times."""
    schedules = current_schedules(ch, list(customers))  # an Array parameter
    by_customer: dict[str, list[dict[str, Any]]] = {c: [] for c in customers}
    for chunk in customer_chunks(customers):  # an IN list
        for window in latest_windows(ch, customer_ids=chunk, start_ms=start_ms, end_ms=end_ms):
            found = by_customer.get(str(window["customer_id"]))
            if found is not None:
                found.append(window)
    return schedules, by_customer


def schedule_history(ch: ClickHouse, customer_id: str) -> list[ScheduleRow]:
    """Every change of one customer's schedule, oldest first (the audit trail)."""
    rows = ch.query_rows(
        """
        SELECT customer_id, plans, effective_from, origin, changed_by, changed_at, version
        FROM customer_plans WHERE customer_id = {customer:String}
        ORDER BY version LIMIT 1 BY version
        """,
        parameters={"customer": customer_id},
    )
    return [_schedule_row(r) for r in rows]


def append_schedule(
    ch: ClickHouse,
    customer_id: str,
    schedule: Sequence[tuple[str, int]],
    origin: str,
    changed_by: str,
    version: int | None = None,
) -> ScheduleRow | None:
    """Record ``customer_id``'s new schedule; ``None`` (nothing written) when unchanged.

    Without ``version`` the change is newer than every change so far
    (``max(now, current + 1)`` ms); with one (a topic record's timestamp) it is as given.
    """
    ordered = tuple(sorted(((str(p), int(ms)) for p, ms in schedule), key=lambda x: x[1]))
    current = current_schedules(ch, [customer_id]).get(customer_id)
    if version is None and (current.schedule if current else ()) == ordered:
        return None
    now = _now_ms()
    version = next_version(current, version, now)
    row = ScheduleRow(customer_id, origin, changed_by, now, version, ordered)
    ch.insert(
        CUSTOMER_PLANS,
        [
            (
                customer_id,
                [p for p, _ in ordered],
                [_dt(ms) for _, ms in ordered],
                origin,
                changed_by,
                _dt(now),
                version,
            )
        ],
        column_names=list(CUSTOMER_PLANS_COLUMNS),
    )
    return row


# ------------------------------------------------------------------ priced usage


def write_priced_usage(ch: ClickHouse, rows: Sequence[Sequence[Any]]) -> None:
    """Append one pricing run's rows (columns :data:`PRICED_USAGE_COLUMNS`)."""
    if rows:
        ch.insert(PRICED_USAGE_RUNS, rows, column_names=list(PRICED_USAGE_COLUMNS))
