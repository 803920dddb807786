"""ClickHouse ``stripe_uncorrectable``: what Stripe holds wrong and meterstream no longer
corrects, per meter, customer and period (computed by pipeline/billing/stripe_corrections.py,
written here as the dicts of its ``Uncorrectable.as_dict()``).

One row per check, versioned; the greatest version per (meter, customer_id, period) is
current; ``difference`` 0 (reason ``resolved``) means a later check found Stripe right.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from meterstream.sinks.clickhouse.client import ClickHouse

STRIPE_UNCORRECTABLE = "stripe_uncorrectable"
COLUMNS = (
    "meter",
    "customer_id",
    "stripe_customer_id",
    "period",
    "formula",
    "stripe_value",
    "expected",
    "exact_total",
    "difference",
    "to_credit",
    "reason",
    "detected_at",
    "version",
)


def write(ch: ClickHouse, found: Iterable[dict[str, Any]]) -> int:
    """Record each check (``Uncorrectable.as_dict()``; reason ``resolved`` with difference
    0 for one found right again)."""
    now = time.time_ns()
    at = dt.datetime.fromtimestamp(now / 1e9, tz=dt.UTC)
    rows = [
        (
            item["meter"],
            item["customer_id"],
            item["stripe_customer_id"],
            item["period"],
            item["formula"],
            item["stripe_value"],
            item["expected"],
            Decimal(item["exact_total"]),
            item["difference"],
            item["to_credit"],
            item["reason"],
            at,
            now,
        )
        for item in found
    ]
    if rows:
        ch.insert(STRIPE_UNCORRECTABLE, rows, column_names=list(COLUMNS))
    return len(rows)


def current(
    ch: ClickHouse, period: str | None = None, meter: str | None = None
) -> list[dict[str, Any]]:
    """The current row of every (meter, customer, period) still wrong at Stripe (of
    ``period`` and ``meter`` when given), by period, meter and customer."""
    where = ["1"]
    params: dict[str, Any] = {}
    if period is not None:
        where.append("period = {period:String}")
        params["period"] = period
    if meter is not None:
        where.append("meter = {meter:String}")
        params["meter"] = meter
    sql = f"""
SELECT meter, customer_id, period,
       argMax(stripe_customer_id, version), argMax(formula, version),
       argMax(stripe_value, version), argMax(expected, version),
       argMax(exact_total, version), argMax(difference, version),
       argMax(to_credit, version), argMax(reason, version),
       toUnixTimestamp64Milli(argMax(detected_at, version))
FROM {STRIPE_UNCORRECTABLE}
WHERE {" AND ".join(where)}
GROUP BY meter, customer_id, period
HAVING argMax(reason, version) != 'resolved'
ORDER BY period, meter, customer_id
"""
    out = []
    for r in ch.query_rows(sql, parameters=params):
        out.append(
            {
                "meter": r[0],
                "customer_id": r[1],
                "period": r[2],
                "stripe_customer_id": r[3],
                "formula": r[4],
                "stripe_value": None if r[5] is None else int(r[5]),
                "expected": int(r[6]),
                "exact_total": str(Decimal(r[7])),
                "difference": int(r[8]),
                "to_credit": int(r[9]),
                "reason": r[10],
                "detected_at_ms": int(r[11]),
            }
        )
    return out
