"""The forwarder's full verification of a billing period, on a real ClickHouse: read in
customer slices (never every event of the period at once), it still covers every
customer the record or meter_windows knows, repairs what differs and gives the
record's totals.

Runs on embedded chdb and, where a Docker engine exists, a ClickHouse server.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
import yaml

import pipeline.forwarding as forwarding
from pipeline.aggregation import WindowState
from pipeline.billing import customer_totals
from pipeline.chio import ClickHouseIO
from pipeline.events import UsageEvent
from pipeline.meters import parse_meters
from pipeline.metrics import Metrics
from pipeline.reconcile import reconcile_meter, record_states
from pipeline.settings import Settings
from sinks.clickhouse.client import ClickHouse
from sinks.clickhouse.migrate import migrate
from sinks.clickhouse.writer import (
    METER_WINDOWS,
    METER_WINDOWS_COLUMNS,
    USAGE_EVENTS,
    USAGE_EVENTS_COLUMNS,
    meter_window_row,
    usage_event_row,
)
from tests.integration.clickhouse_fixtures import *  # noqa: F403

pytestmark = pytest.mark.integration

HOUR = 3_600_000
START = 1_790_000_000_000 // (24 * HOUR) * (24 * HOUR)  # a UTC midnight
END = START + 3 * 24 * HOUR
METERS = parse_meters(
    yaml.safe_load(
        """
meters:
  - name: tokens
    event_name: chat
    aggregation: sum
    value: properties.tokens
    window: hour
    stripe: {event_name: tokens, interval: 30s}
"""
    )
)
METER = METERS.by_name("tokens")
CUSTOMERS = [f"c{i}" for i in range(5)]


def test_full_verification_reads_in_slices_and_misses_no_one(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(ch)
    events = [
        UsageEvent("chat", c, f"k{c}-{j}", START + j * 7 * HOUR + i, {"tokens": Decimal(j + i)})
        for i, c in enumerate(CUSTOMERS)
        for j in range(8)
    ]
    # and one outside the period, which must not count
    events.append(UsageEvent("chat", "c0", "late", END + HOUR, {"tokens": Decimal(1000)}))
    ch.insert(
        USAGE_EVENTS, [usage_event_row(e, 1, ["tokens"]) for e in events], USAGE_EVENTS_COLUMNS
    )
    # meter_windows: c1's first window is wrong, and c9 has a window but no event
    stale = WindowState(value=Decimal(5), event_count=1)
    rows = [
        meter_window_row(
            "tokens", "sum", c, "{}", START, START + HOUR, stale, 1, 1, value=Decimal(5)
        )
        for c in ("c1", "c9")
    ]
    ch.insert(METER_WINDOWS, rows, column_names=list(METER_WINDOWS_COLUMNS))

    monkeypatch.setattr(forwarding, "REVERIFY_CUSTOMERS_PER_CALL", 2)
    monkeypatch.setattr(forwarding, "REVERIFY_PAUSE_FACTOR", 0.0)
    forwarder = forwarding.Forwarder(
        Settings(),
        METERS,
        ClickHouseIO(ch, Metrics()),
        Metrics(),
        client=None,  # type: ignore[arg-type]
    )
    forwarder.track_changes()
    slices: list[list[str] | None] = []
    reconcile = forwarder._reconcile

    async def spy(meter: Any, start: int, end: int, customers: Any = None) -> Any:
        slices.append(None if customers is None else list(customers))
        return await reconcile(meter, start, end, customers)

    monkeypatch.setattr(forwarder, "_reconcile", spy)
    diffs, totals = asyncio.run(forwarder._verify(METER, "2026-09", START, END))

    # six customers (c9 from meter_windows only), two per read, each read once
    assert slices == [["c0", "c1"], ["c2", "c3"], ["c4", "c9"]]
    everyone = record_states(ch, METERS, METER, START, END)
    assert totals == customer_totals(METER, everyone)
    assert totals["c0"] == sum(Decimal(j) for j in range(8))  # not the late event
    assert "c9" not in totals
    # every window was missing or wrong, c9's is extra: all repaired, so a read of
    # the whole period at once finds nothing left to fix
    assert len(diffs) == len(everyone) + 1
    assert {d.key.customer_id for d in diffs} == {*CUSTOMERS, "c9"}
    left, _ = reconcile_meter(ch, METERS, METER, START, END, fix=False)
    assert left == []
