"""``priced_usage_daily`` against the preview, on real ClickHouse (chdb, and a server where
Docker runs): every aggregation, every price model, groups, fractional and negative
values, a mid-period plan change. Summed per customer, meter and plan and rounded once,
the view's days are the preview's usage lines; its last period-to-date value is the
line's quantity.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest

from meterstream.meters.aggregation import WindowState
from meterstream.pricing.invoice import Period
from meterstream.pricing.plans import parse_plans
from meterstream.sinks.clickhouse import pricing as store
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.clickhouse.writer import (
    METER_WINDOWS,
    METER_WINDOWS_COLUMNS,
    meter_window_row,
)
from meterstream.worker import invoices
from meterstream.worker.invoices import (
    period_customers,
    preview,
    price_period,
    priced_period_rows,
    priced_usage_rows,
)
from tests.integration.clickhouse_fixtures import *  # noqa: F403

pytestmark = pytest.mark.integration

HOUR = 3_600_000
DAY = 24 * HOUR
AGGREGATIONS = {
    "m_sum": "sum",
    "m_count": "count",
    "m_max": "max",
    "m_min": "min",
    "m_unique": "unique_count",
    "m_latest": "latest",
}
TIERS = [
    {"up_to": 40, "unit_price": "0.5", "flat_price": "2"},
    {"up_to": 200, "unit_price": "0.125", "flat_price": "1"},
    {"up_to": "inf", "unit_price": "0.0333"},
]
PLANS = {
    "plans": [
        {
            "name": "a",
            "currency": "usd",
            "base_fee": "9.99",
            "prices": [
                {"meter": "m_sum", "unit_price": "0.0125"},
                {
                    "meter": "m_count",
                    "billing_scheme": "tiered",
                    "tiers_mode": "graduated",
                    "tiers": TIERS,
                },
                {
                    "meter": "m_max",
                    "billing_scheme": "tiered",
                    "tiers_mode": "volume",
                    "tiers": TIERS,
                },
                {"meter": "m_min", "unit_price": "0.7"},
                {
                    "meter": "m_unique",
                    "unit_price": "1.15",
                    "transform_quantity": {"divide_by": 3, "round": "up"},
                },
                {"meter": "m_latest", "unit_price": "0.333"},
            ],
        },
        {
            "name": "b",
            "currency": "usd",
            "prices": [
                {
                    "meter": "m_sum",
                    "billing_scheme": "tiered",
                    "tiers_mode": "volume",
                    "tiers": TIERS,
                },
                {
                    "meter": "m_count",
                    "unit_price": "0.21",
                    "transform_quantity": {"divide_by": 7, "round": "down"},
                },
                {
                    "meter": "m_max",
                    "billing_scheme": "tiered",
                    "tiers_mode": "graduated",
                    "tiers": TIERS,
                },
                {
                    "meter": "m_latest",
                    "billing_scheme": "tiered",
                    "tiers_mode": "graduated",
                    "tiers": TIERS,
                },
            ],
        },
    ],
    "default_plan": "b",
}


def _windows(rng: random.Random, start_ms: int) -> list[tuple[object, ...]]:
    rows = []
    for customer in ("x", "y"):
        for meter, aggregation in AGGREGATIONS.items():
            for group in ('{"g":"1"}', '{"g":"2"}'):
                for _ in range(rng.randrange(3, 12)):
                    ws = start_ms + rng.randrange(0, 20 * 24) * HOUR
                    state = WindowState(event_count=rng.randrange(1, 9))
                    if aggregation == "count":
                        value = Decimal(state.event_count)
                    elif aggregation == "unique_count":
                        state.distinct = {f"u{rng.randrange(15)}" for _ in range(3)}
                        value = Decimal(len(state.distinct))
                    else:
                        value = Decimal(rng.randrange(-300, 9000)) / 100
                    if aggregation == "latest":
                        state.latest_ts, state.latest_key = (
                            ws + rng.randrange(HOUR),
                            f"k{rng.randrange(99)}",
                        )
                    state.value = value
                    rows.append(
                        meter_window_row(
                            meter,
                            aggregation,
                            customer,
                            group,
                            ws,
                            ws + HOUR,
                            state,
                            1,
                            ws,
                            value=value,
                        )
                    )
    return rows


def _november(ch: ClickHouse, seed: int) -> tuple[Period, int]:
    """November 2026 with random windows of customers x and y; (period, its start ms)."""
    migrate(ch)
    period = Period.month("2026-11")
    start = int(period.start.timestamp() * 1000)
    rows = _windows(random.Random(seed), start)
    # one window per key: drop repeats of a (meter, customer, group, window_start)
    unique = {(r[0], r[2], r[3], r[4]): r for r in rows}
    ch.insert(METER_WINDOWS, list(unique.values()), list(METER_WINDOWS_COLUMNS))
    return period, start


def test_priced_usage_daily_equals_the_preview(ch: ClickHouse) -> None:
    period, start = _november(ch, 11)
    change = start + 9 * DAY + 7 * HOUR
    store.append_schedule(ch, "x", [("a", start - DAY), ("b", change)], "cli", "test")
    plans = parse_plans(PLANS)
    assert price_period(ch, plans, period) > 0

    view: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    last_to_date: dict[tuple[str, str, str], tuple[str, Decimal]] = {}
    for customer, meter, plan, day, amount, to_date in ch.query_rows(
        "SELECT customer_id, meter, plan, day, toString(amount), toString(period_to_date)"
        " FROM priced_usage_daily ORDER BY day"
    ):
        view[(customer, plan, meter)] += Decimal(amount)
        last_to_date[(customer, plan, meter)] = (str(day), Decimal(to_date))

    expected: dict[tuple[str, str, str], Decimal] = {}
    quantities: dict[tuple[str, str, str], Decimal] = {}
    for customer in ("x", "y"):
        invoice = preview(ch, plans, customer, period)
        assert [s.plan for s in invoice.segments] == (["a", "b"] if customer == "x" else ["b"])
        for line in invoice.lines:
            if line.kind == "usage":
                assert line.meter is not None and line.charge is not None
                expected[(customer, line.plan, line.meter)] = line.amount
                quantities[(customer, line.plan, line.meter)] = line.charge.quantity
    rounded = {k: v.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP) for k, v in view.items()}
    assert rounded == expected
    assert {k: v for k, (_, v) in last_to_date.items()} == quantities
    # a second run replaces the first in the view (the latest run of a period counts)
    assert price_period(ch, plans, period, run=2**62) > 0
    again: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for customer, meter, plan, amount in ch.query_rows(
        "SELECT customer_id, meter, plan, toString(amount) FROM priced_usage_daily"
    ):
        again[(customer, plan, meter)] += Decimal(amount)
    assert again == view
    assert datetime.fromtimestamp(change / 1000, UTC).day == 10


def test_a_pricing_run_reads_in_slices_what_each_customer_reads_alone(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run reads schedules and windows for many customers at once; its rows are, row
    for row, those of each customer priced alone (a plan change mid-period included),
    whatever the slice size."""
    period, start = _november(ch, 5)
    store.append_schedule(ch, "x", [("a", start - DAY), ("b", start + 3 * DAY)], "cli", "test")
    plans = parse_plans(PLANS)
    customers = period_customers(ch, period)
    assert customers == ["x", "y"]
    alone = sorted(row for c in customers for row in priced_usage_rows(ch, plans, c, period, 7))
    assert len({row[0] for row in alone}) == 2
    for size in (1, 500):
        monkeypatch.setattr(invoices, "PRICING_SLICE", size)
        assert sorted(priced_period_rows(ch, plans, period, 7)) == alone
    # a customer with no windows is priced as alone (zero rows on its plan)
    nobody = priced_usage_rows(ch, plans, "nobody", period, 7)
    assert priced_period_rows(ch, plans, period, 7, customers=["nobody"]) == nobody
