"""The forwarder's verification of a billing period, on a real ClickHouse.

- The full read, in customer slices (never every event of the period at once),
  covers every customer the record or meter_windows knows, repairs what differs and
  gives the record's totals.
- After it, a round merges what the worker told it it inserted and checks each
  changed customer-day against the record and the stored windows, re-reading only a
  day that differs (an event the worker never told, a key the record holds once but
  the worker counted twice, a stored window gone wrong).

Runs on embedded chdb and, where a Docker engine exists, a ClickHouse server.
"""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from typing import Any

import pytest

import meterstream.billing.verify as verification
from meterstream.billing.plan import customer_totals
from meterstream.billing.record import read_record, reconcile_meter
from meterstream.events import UsageEvent
from meterstream.meters.aggregation import WindowState
from meterstream.meters.config import parse_meters
from meterstream.meters.fold import WindowKey, contributions, recompute_windows, windows_of
from meterstream.metrics import Metrics
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.clickhouse.queries import day_check
from meterstream.sinks.clickhouse.writer import (
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
DAY = 24 * HOUR
START = 1_790_000_000_000 // DAY * DAY  # a UTC midnight
END = START + 3 * DAY
# the hourly Stripe meter of these tests: plain (METERS) and by model (GROUPED)
TOKENS = {
    "name": "tokens",
    "event_name": "chat",
    "aggregation": "sum",
    "value": "properties.tokens",
    "window": "hour",
    "stripe": {"event_name": "tokens", "interval": "30s"},
}
METERS = parse_meters({"meters": [TOKENS]})
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

    monkeypatch.setattr(verification, "REVERIFY_CUSTOMERS_PER_CALL", 2)
    monkeypatch.setattr(verification, "REVERIFY_PAUSE_FACTOR", 0.0)
    verifier = verification.Verifier(METERS, ClickHouseIO(ch, Metrics()), Metrics())
    verifier.track_changes()
    slices: list[list[str] | None] = []
    reconcile = verifier._verify_range

    async def spy(meter: Any, start: int, end: int, customers: Any = None) -> Any:
        slices.append(None if customers is None else list(customers))
        return await reconcile(meter, start, end, customers)

    monkeypatch.setattr(verifier, "_verify_range", spy)
    diffs, totals = asyncio.run(verifier.verify(METER, "2026-09", START, END))

    # six customers (c9 from meter_windows only), two per read, each read once
    assert slices == [["c0", "c1"], ["c2", "c3"], ["c4", "c9"]]
    everyone = read_record(ch, METERS, METER, START, END).states
    assert totals == customer_totals(METER, everyone)
    assert totals["c0"] == sum(Decimal(j) for j in range(8))  # not the late event
    assert "c9" not in totals
    # every window was missing or wrong, c9's is extra: all repaired, so a read of
    # the whole period at once finds nothing left to fix
    assert len(diffs) == len(everyone) + 1
    assert {d.key.customer_id for d in diffs} == {*CUSTOMERS, "c9"}
    assert reconcile_meter(ch, METERS, METER, START, END, fix=False)[0] == []


# -- after the full read: what the worker tells, checked against the record --

GROUPED = parse_meters(
    {
        "meters": [
            {
                **TOKENS,
                "group_by": ["properties.model"],
                "filters": [{"property": "properties.model", "operator": "neq", "value": "skip"}],
            }
        ]
    }
)
GROUPED_METER = GROUPED.by_name("tokens")
VERSION = itertools.count(1)


def chat(customer: str, key: str, at: int, tokens: int, model: str = "a") -> UsageEvent:
    return UsageEvent("chat", customer, key, at, {"tokens": Decimal(tokens), "model": model})


def insert_record(ch: ClickHouse, events: list[UsageEvent]) -> None:
    rows = [usage_event_row(e, 1, ["tokens"]) for e in events]
    ch.insert(USAGE_EVENTS, rows, USAGE_EVENTS_COLUMNS)


def store_windows(ch: ClickHouse, states: dict[WindowKey, WindowState]) -> None:
    """New versions of these windows in meter_windows, as the worker writes them."""
    version = next(VERSION)
    rows = [
        meter_window_row(
            k.meter,
            "sum",
            k.customer_id,
            k.group_key,
            k.window_start_ms,
            k.window_start_ms + HOUR,
            s,
            version,
            1,
            value=s.value or Decimal(0),
        )
        for k, s in states.items()
    ]
    ch.insert(METER_WINDOWS, rows, column_names=list(METER_WINDOWS_COLUMNS))


def worker_batch(ch: ClickHouse, verifier: verification.Verifier, batch: list[UsageEvent]) -> None:
    """What the worker does for a batch: the record, then its windows' new states in
    meter_windows, then it tells the verifier what it inserted."""
    insert_record(ch, batch)
    deltas = contributions(GROUPED, batch).states
    truth = read_record(ch, GROUPED, GROUPED_METER, START, END).states
    store_windows(ch, {k: truth[k] for k in deltas})
    verifier.record_changed(batch, deltas, set())


def test_rounds_merge_what_was_told_and_reread_only_what_differs(
    ch: ClickHouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(ch)
    customers = [f"c{i}" for i in range(4)]
    insert_record(
        ch,
        [
            chat(c, f"k{c}-{j}", START + j * 5 * HOUR + i, j + i, model="ab"[j % 2])
            for i, c in enumerate(customers)
            for j in range(10)
        ],
    )
    monkeypatch.setattr(verification, "REVERIFY_PAUSE_FACTOR", 0.0)
    metrics = Metrics()
    verifier = verification.Verifier(GROUPED, ClickHouseIO(ch, metrics), metrics)
    verifier.track_changes()
    reads: list[tuple[int, int, list[str] | None]] = []
    reconcile = verifier._verify_range

    async def spy(meter: Any, start: int, end: int, chosen: Any = None) -> Any:
        reads.append((start, end, None if chosen is None else list(chosen)))
        return await reconcile(meter, start, end, chosen)

    monkeypatch.setattr(verifier, "_verify_range", spy)

    def verify() -> dict[str, Decimal]:
        _, totals = asyncio.run(verifier.verify(GROUPED_METER, "2026-09", START, END))
        assert totals == customer_totals(
            GROUPED_METER, read_record(ch, GROUPED, GROUPED_METER, START, END).states
        )
        return totals

    # told before the full read, which reads it: it must not be merged again after
    worker_batch(ch, verifier, [chat("c3", "n0", START + 7 * HOUR, 3)])
    verify()  # the full read, which also stores every window
    assert reads == [(START, END, customers)]
    assert reconcile_meter(ch, GROUPED, GROUPED_METER, START, END, fix=False)[0] == []

    # 1. Told batches (a new customer, one the meter filters out, late events): no re-read.
    reads.clear()
    worker_batch(ch, verifier, [chat("c0", "n1", START + HOUR, 5), chat("c9", "n2", START, 7)])
    worker_batch(
        ch,
        verifier,
        [chat("c1", "n3", START + 2 * DAY, 11, "b"), chat("c2", "n4", START + 3, 1, "skip")],
    )
    totals = verify()
    assert reads == []
    assert totals["c9"] == 7
    assert metrics.verify_days.get(meter="tokens", result="checked") == 4

    # 2. An event in the record the worker never told of, on a day that changed: that
    #    day alone is re-read, and its stored window repaired.
    reads.clear()
    insert_record(ch, [chat("c1", "untold", START + 2 * DAY + 1, 100, "b")])
    worker_batch(ch, verifier, [chat("c1", "n5", START + 2 * DAY + HOUR, 1)])
    worker_batch(ch, verifier, [chat("c3", "n6", START + DAY, 2)])
    verify()
    assert reads == [(START + 2 * DAY, START + 3 * DAY, ["c1"])]
    assert reconcile_meter(ch, GROUPED, GROUPED_METER, START, END, fix=False)[0] == []

    # 3. A key the record already holds, told again (the record counts its first copy):
    #    the event counts differ, the day is re-read, the key counts once.
    reads.clear()
    again = chat("c2", "kc2-3", START + 3 * 5 * HOUR + 2, 3, "b")
    verifier.record_changed([again], contributions(GROUPED, [again]).states, set())
    insert_record(ch, [again])
    totals = verify()
    assert reads == [(START, START + DAY, ["c2"])]

    # 4. A stored window that went wrong on a changed day is found and repaired.
    reads.clear()
    truth = read_record(ch, GROUPED, GROUPED_METER, START, END).states
    key = next(k for k in truth if k.customer_id == "c0" and k.window_start_ms == START + HOUR)
    store_windows(ch, {key: WindowState(event_count=truth[key].event_count, value=Decimal(-1))})
    worker_batch(ch, verifier, [chat("c0", "n7", START + 4 * HOUR, 1)])
    verify()
    assert reads == [(START, START + DAY, ["c0"])]
    assert reconcile_meter(ch, GROUPED, GROUPED_METER, START, END, fix=False)[0] == []


def test_day_check_counts_as_a_reread_does(ch: ClickHouse) -> None:
    migrate(ch)
    events = [
        chat("a", "k1", START + HOUR, 1),
        chat("a", "k1", START + HOUR, 1),  # the same key twice: counted once
        chat("a", "k2", START + DAY + 1, 2, "skip"),  # filtered out, still an event
        chat("b", "k3", START + 5, 4),
        chat("b", "k4", END, 8),  # outside the range
    ]
    # a value the meter cannot read: its window is there, empty, as a recompute has it
    bad = UsageEvent("chat", "b", "k5", START + 2 * HOUR, {"tokens": "many", "model": "a"})
    insert_record(ch, [*events, bad])
    states, days = read_record(ch, GROUPED, GROUPED_METER, START, END)
    distinct = [events[0], *events[2:4], bad]
    assert states == recompute_windows(GROUPED, windows_of(GROUPED, distinct), distinct)
    assert states[next(iter(windows_of(GROUPED, [bad])))] == WindowState()
    assert days == {("a", START): 1, ("a", START + DAY): 1, ("b", START): 2}
    store_windows(ch, states)
    record, stored = day_check(ch, "tokens", "chat", ["a", "b"], START, END)
    assert record == days
    assert stored == {("a", START): (Decimal(1), 1), ("b", START): (Decimal(4), 1)}
