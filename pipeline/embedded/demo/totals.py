"""What the demo compares: the record's totals per meter and customer (read through the
running worker's SQL) and what the Stripe emulator received, by each meter's formula;
and the demo customers' mapping to their Stripe customers."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from meterstream.billing.customers import set_mapping
from meterstream.embedded.demo.load import STRIPE_CUSTOMERS
from meterstream.embedded.harness import http_json
from meterstream.meters.config import MetersConfig
from meterstream.meters.windows import month_bounds
from meterstream.settings import Settings
from meterstream.sinks.stripe.payloads import formula_for

TOTALS_SQL = """
SELECT meter, customer_id, any(aggregation) AS aggregation,
       sum(value) AS total, max(value) AS maximum, min(value) AS minimum,
       length(groupUniqArrayArray(distinct_values)) AS distinct_count,
       argMax(value, (latest_ts, latest_key)) AS latest
FROM (
    SELECT meter, customer_id, group_key, window_start,
           argMax(aggregation, version) AS aggregation, argMax(value, version) AS value,
           argMax(distinct_values, version) AS distinct_values,
           argMax(latest_ts, version) AS latest_ts, argMax(latest_key, version) AS latest_key,
           argMax(window_end, version) AS window_end
    FROM meter_windows
    GROUP BY meter, customer_id, group_key, window_start
)
{where}
GROUP BY meter, customer_id
ORDER BY meter, customer_id
"""


def period_totals(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """(meter, customer) -> total, picking the column that fits each aggregation."""
    pick = {
        "sum": "total",
        "count": "total",
        "max": "maximum",
        "min": "minimum",
        "unique_count": "distinct_count",
        "latest": "latest",
    }
    return {(r["meter"], r["customer_id"]): Decimal(str(r[pick[r["aggregation"]]])) for r in rows}


def map_demo_customers(settings: Settings) -> None:
    """Map the demo's customers to their Stripe customers (through the running worker;
    idempotent: a mapping already in place is left as it is)."""
    for customer, stripe_id in sorted(STRIPE_CUSTOMERS.items()):
        set_mapping(settings, customer, stripe_id)


def stripe_totals(
    api_base: str,
    meters: MetersConfig,
    period: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> dict[tuple[str, str], Decimal]:
    """What the emulator received, per (meter, meterstream customer), by the meter's formula.

    ``period`` (``YYYY-MM``): only meter events stamped in that month (the
    forwarder stamps each with a time inside its billing period). Cancelled
    events do not count, as in Stripe's summaries. Stripe customers are mapped
    back to meterstream customers through ``mapping`` (customer -> Stripe id;
    default: the demo's); one no customer maps to is shown under its Stripe id.
    """
    owner = {stripe_id: c for c, stripe_id in (mapping or STRIPE_CUSTOMERS).items()}
    events = http_json(f"{api_base}/_emulator/events")
    if isinstance(events, dict):
        events = events.get("data", [])
    lo, hi = (None, None)
    if period:
        start_ms, end_ms = month_bounds(period)
        lo, hi = start_ms // 1000, end_ms // 1000
    by_name = {m.stripe.event_name: m for m in meters.meters if m.stripe}
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    last: dict[tuple[str, str], tuple[Any, ...]] = {}
    for i, ev in enumerate(events):
        meter = by_name.get(ev["event_name"])
        if meter is None or meter.stripe is None or ev.get("cancelled"):
            continue
        if lo is not None and not lo <= ev["timestamp"] < hi:
            continue
        stripe_customer = ev["payload"][meter.stripe.customer_key]
        customer = owner.get(stripe_customer, stripe_customer)
        value = Decimal(ev["payload"][meter.stripe.value_key])
        key = (meter.name, customer)
        if formula_for(meter.aggregation) == "sum":
            totals[key] += value
        elif key not in last or (ev["timestamp"], i) >= last[key][:2]:
            last[key] = (ev["timestamp"], i, value)
            totals[key] = value
    return dict(totals)
