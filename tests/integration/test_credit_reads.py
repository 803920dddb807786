"""The credit burn's reads of many customers at once (a restart with many books, every
customer on the entitlements topic decided again): one query per slice of customers, each
under ClickHouse's ``max_query_size`` (256 KiB), and every customer priced."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from meterstream.meters.aggregation import WindowState
from meterstream.meters.windows import HOUR_MS, period_label
from meterstream.pricing.invoice import Period
from meterstream.pricing.plans import parse_plans
from meterstream.sinks.clickhouse import queries
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.clickhouse.writer import (
    METER_WINDOWS,
    METER_WINDOWS_COLUMNS,
    meter_window_row,
)
from meterstream.worker.credits import plans_limits, spend_levels_of
from tests.integration.clickhouse_fixtures import *  # noqa: F403

pytestmark = pytest.mark.integration

PLANS = parse_plans(
    {
        "plans": [
            {"name": "free_tier", "currency": "usd", "limits": {"tokens": 1000},
             "prices": [{"meter": "tokens", "unit_price": "0.001"}]},
        ],
        "default_plan": "free_tier",
    }
)  # fmt: skip


def test_spend_levels_of_many_customers_is_read_in_slices(ch: ClickHouse) -> None:
    migrate(ch)
    now = time.time_ns() // 1_000_000
    period = Period.month(period_label(now))
    start = int(period.start.timestamp() * 1000)
    # 8,000 ids of ~56 bytes: one IN list would be ~470 KB of SQL
    customers = [f"customer-{i:06d}-{'x' * 40}" for i in range(8000)]
    used = {customers[0]: 400, customers[4321]: 1500, customers[-1]: 7}
    rows = [
        meter_window_row("tokens", "sum", c, "{}", start, start + HOUR_MS,
                         WindowState(value=Decimal(n), event_count=1), 1, 1, value=Decimal(n))
        for c, n in used.items()
    ]  # fmt: skip
    ch.insert(METER_WINDOWS, rows, column_names=list(METER_WINDOWS_COLUMNS))
    assert len(queries.customer_chunks(customers)) > 1

    levels = spend_levels_of(ch, PLANS, customers, period, limits_at_ms=now)
    assert set(levels) == set(customers)
    for customer, spend in levels.items():
        assert spend.usage == ({"tokens": Decimal(used[customer])} if customer in used else {})
        assert spend.limits == {"tokens": Decimal(1000)}
    spent = {c: sum(a for _, a, _ in levels[c].levels.values()) for c in used}
    assert spent == {c: Decimal(n) * Decimal("0.001") for c, n in used.items()}
    assert plans_limits(ch, PLANS, customers, now) == {
        c: {"tokens": Decimal(1000)} for c in customers
    }
