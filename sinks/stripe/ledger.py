"""The forwarding ledger: ClickHouse ``stripe_meter_events``, one row per identifier.

Rows are versioned (ReplacingMergeTree(version)); the latest version of an
identifier is its state: ``pending`` (written before the send), ``sent`` or
``error`` (with Stripe's error code), or ``cancelled`` (a superseded ``last`` event
cancelled with a meter event adjustment). ``timestamp_s`` is the event's timestamp,
chosen when the row is planned and kept for its resends (0: a row written before the
ledger kept it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.writer import STRIPE_METER_EVENTS, STRIPE_METER_EVENTS_COLUMNS


@dataclass(frozen=True)
class LedgerRow:
    identifier: str
    meter: str
    customer_id: str
    stripe_customer_id: str
    period: str
    value: int
    exact_total: Decimal
    status: str
    error_code: str = ""
    attempts: int = 0
    sent_at_ms: int = 0
    timestamp_s: int = 0

    def with_status(
        self, status: str, error_code: str = "", attempts: int = 0, at_ms: int | None = None
    ) -> LedgerRow:
        """The row in a new state; ``sent_at`` is set (to ``at_ms``, default now) when it
        becomes ``sent``, and kept by later states: a cancellation is judged by it."""
        now = at_ms if at_ms is not None else time.time_ns() // 1_000_000
        return LedgerRow(
            self.identifier,
            self.meter,
            self.customer_id,
            self.stripe_customer_id,
            self.period,
            self.value,
            self.exact_total,
            status,
            error_code,
            attempts or self.attempts,
            now if status == "sent" and self.status != "sent" else self.sent_at_ms,
            self.timestamp_s,
        )


def _ms_to_dt(ms: int) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def write(ch: ClickHouse, rows: list[LedgerRow]) -> None:
    now_ms = time.time_ns() // 1_000_000
    version = time.time_ns()
    ch.insert(
        STRIPE_METER_EVENTS,
        [
            (
                r.identifier,
                r.meter,
                r.customer_id,
                r.stripe_customer_id,
                r.period,
                r.value,
                r.exact_total,
                r.status,
                r.error_code,
                r.attempts,
                _ms_to_dt(r.sent_at_ms),
                _ms_to_dt(now_ms),
                version,
                r.timestamp_s,
            )
            for r in rows
        ],
        column_names=list(STRIPE_METER_EVENTS_COLUMNS),
    )


_SELECT = """
SELECT identifier,
       argMax(meter, version), argMax(customer_id, version), argMax(stripe_customer_id, version),
       argMax(period, version), argMax(value, version), argMax(exact_total, version),
       argMax(status, version), argMax(error_code, version), argMax(attempts, version),
       toUnixTimestamp64Milli(argMax(sent_at, version)), argMax(timestamp_s, version)
FROM stripe_meter_events
WHERE {where}
GROUP BY identifier
ORDER BY identifier
"""


def _rows(ch: ClickHouse, where: str, params: dict[str, Any]) -> list[LedgerRow]:
    out = []
    for r in ch.query_rows(_SELECT.format(where=where), parameters=params):
        out.append(
            LedgerRow(
                str(r[0]),
                r[1],
                r[2],
                r[3],
                r[4],
                int(r[5]),
                Decimal(r[6]),
                r[7],
                r[8],
                int(r[9]),
                int(r[10]),
                int(r[11]),
            )
        )
    return out


def for_period(ch: ClickHouse, meter: str, period: str) -> list[LedgerRow]:
    return _rows(
        ch,
        "meter = {meter:String} AND period = {period:String}",
        {"meter": meter, "period": period},
    )


def periods(ch: ClickHouse, meter: str) -> list[str]:
    """The billing periods ``meter`` has ledger rows for, in order."""
    rows = ch.query_rows(
        "SELECT DISTINCT period FROM stripe_meter_events WHERE meter = {meter:String} "
        "ORDER BY period",
        parameters={"meter": meter},
    )
    return [str(r[0]) for r in rows]


def by_status(ch: ClickHouse, status: str) -> list[LedgerRow]:
    rows = _rows(ch, "1", {})
    return [r for r in rows if r.status == status]
