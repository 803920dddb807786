"""Schema, views, writer and queries against a real ClickHouse.

Every test runs on embedded chdb and, where a Docker engine exists, on a
ClickHouse server started by testcontainers (``ch`` is parametrized; the
server variant skips with a clear reason otherwise).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterstream.errors import ClickHouseError, MigrationError
from meterstream.events import Reason, Rejection, UsageEvent
from meterstream.meters.aggregation import WindowState
from meterstream.metrics import Metrics
from meterstream.sinks.clickhouse import client as client_module
from meterstream.sinks.clickhouse import pricing
from meterstream.sinks.clickhouse import queries as q
from meterstream.sinks.clickhouse.analyst import AnalystSQL, SqlLimits
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import MIGRATIONS_DIR, migrate
from meterstream.sinks.clickhouse.writer import (
    METER_WINDOWS,
    METER_WINDOWS_COLUMNS,
    REJECTED_EVENTS,
    REJECTED_EVENTS_COLUMNS,
    USAGE_EVENTS,
    USAGE_EVENTS_COLUMNS,
    call_token,
    meter_window_row,
    rejected_row,
    usage_event_row,
    usage_event_rows,
)
from tests.integration.clickhouse_fixtures import *  # noqa: F403
from tests.support import MIGRATIONS

pytestmark = pytest.mark.integration

HOUR = 3_600_000
DAY = 24 * HOUR


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def db(ch: ClickHouse) -> ClickHouse:
    assert migrate(ch) == MIGRATIONS
    return ch


# ---------------------------------------------------------------- migrations


def test_migrations_apply_once(ch: ClickHouse) -> None:
    assert migrate(ch) == MIGRATIONS
    assert migrate(ch) == []
    tables = {
        name: engine
        for name, engine in ch.query_rows(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
        )
    }
    assert tables == {
        "schema_migrations": "MergeTree",
        "usage_events": "ReplacingMergeTree",
        "meter_windows": "ReplacingMergeTree",
        "rejected_events": "MergeTree",
        "stripe_meter_events": "ReplacingMergeTree",
        "meter_usage": "View",
        "meter_usage_hourly": "View",
        "meter_usage_daily": "View",
        "meter_usage_monthly": "View",
        "customer_mappings": "ReplacingMergeTree",
        "stripe_customer_pins": "MergeTree",
        "stripe_customer_refusals": "ReplacingMergeTree",
        "customer_plans": "ReplacingMergeTree",
        "priced_usage_runs": "MergeTree",
        "priced_usage_daily": "View",
        "credit_grants": "ReplacingMergeTree",
        "credit_ledger": "ReplacingMergeTree",
        "credit_alert_thresholds": "ReplacingMergeTree",
        "credit_alerts": "ReplacingMergeTree",
        "credit_alert_deliveries": "ReplacingMergeTree",
        "corrections": "ReplacingMergeTree",
        "event_corrections": "ReplacingMergeTree",
        "usage_events_effective": "View",
        "credit_purchases": "MergeTree",
        "credit_recharge": "MergeTree",
        "stripe_uncorrectable": "ReplacingMergeTree",
    }
    recorded = ch.query_rows("SELECT version, name FROM schema_migrations ORDER BY version")
    assert recorded == [(i + 1, name) for i, name in enumerate(MIGRATIONS)]
    view_columns = ch.query_rows(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase()"
        " AND table = 'meter_usage' ORDER BY position"
    )
    assert view_columns == [
        ("period", "LowCardinality(String)"),
        ("period_start", "DateTime64(3, 'UTC')"),
        ("meter", "LowCardinality(String)"),
        ("aggregation", "LowCardinality(String)"),
        ("customer_id", "String"),
        ("group_key", "String"),
        ("value", "Decimal(38, 9)"),
        ("event_count", "UInt64"),
        ("windows", "UInt64"),
    ]
    skip_indexes = ch.query_rows(
        "SELECT table, name, type FROM system.data_skipping_indices"
        " WHERE database = currentDatabase()"
    )
    assert skip_indexes == [("usage_events", "idx_timestamp", "minmax")]


def test_changed_checksum_is_refused(ch: ClickHouse, tmp_path: Path) -> None:
    for path in MIGRATIONS_DIR.glob("000[12]_*.sql"):
        shutil.copy(path, tmp_path / path.name)
    assert migrate(ch, tmp_path) == ["0001_usage_events", "0002_meter_windows"]
    target = tmp_path / "0002_meter_windows.sql"
    target.write_text(target.read_text() + "\n-- edited after it was applied\n")
    with pytest.raises(MigrationError, match="0002_meter_windows was applied with checksum"):
        migrate(ch, tmp_path)


def test_failing_migration_raises_with_the_clickhouse_code(ch: ClickHouse, tmp_path: Path) -> None:
    shutil.copy(MIGRATIONS_DIR / "0001_usage_events.sql", tmp_path)
    (tmp_path / "0002_broken.sql").write_text(
        "CREATE TABLE IF NOT EXISTS ok_first (a UInt8) ENGINE = MergeTree ORDER BY a;\n"
        "ALTER TABLE no_such_table ADD COLUMN b UInt8;\n"
    )
    (tmp_path / "0003_later.sql").write_text(
        "CREATE TABLE IF NOT EXISTS later (a UInt8) ENGINE = MergeTree ORDER BY a;\n"
    )
    with pytest.raises(MigrationError) as info:
        migrate(ch, tmp_path)
    assert info.value.code == 60  # UNKNOWN_TABLE
    assert "0002_broken statement 2 failed" in str(info.value)
    assert ch.query_rows("SELECT name FROM schema_migrations") == [("0001_usage_events",)]
    assert ch.query_rows("EXISTS TABLE later") == [(0,)]
    # fix the migration: the re-runnable statements complete it
    (tmp_path / "0002_broken.sql").write_text(
        "CREATE TABLE IF NOT EXISTS ok_first (a UInt8) ENGINE = MergeTree ORDER BY a;\n"
        "ALTER TABLE ok_first ADD COLUMN IF NOT EXISTS b UInt8;\n"
    )
    assert migrate(ch, tmp_path) == ["0002_broken", "0003_later"]


# ---------------------------------------------------------------- views against a reference


@dataclass(frozen=True)
class W:
    meter: str
    aggregation: str
    customer_id: str
    group_key: str
    start: int
    end: int
    value: Decimal
    event_count: int
    version: int
    distinct: frozenset[str] = frozenset()
    latest_ts: int = 0
    latest_key: str = ""

    def row(self) -> tuple[Any, ...]:
        state = SimpleNamespace(
            event_count=self.event_count,
            distinct=set(self.distinct),
            latest_ts=self.latest_ts,
            latest_key=self.latest_key,
        )
        return meter_window_row(
            self.meter, self.aggregation, self.customer_id, self.group_key, self.start,
            self.end, state, self.version, 1, value=self.value,
        )  # fmt: skip


def period_start(epoch_ms: int, period: str | None) -> int | None:
    if period is None:
        return None
    t = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    if period == "hour":
        t = t.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        t = t.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        t = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(t.timestamp() * 1000)


def reference(windows: Iterable[W], period: str | None) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Independent Python merge: latest version per window, then per-aggregation totals."""
    latest: dict[tuple[str, str, str, int], W] = {}
    for w in windows:
        key = (w.meter, w.customer_id, w.group_key, w.start)
        if key not in latest or w.version > latest[key].version:
            latest[key] = w
    groups: dict[tuple[Any, ...], list[W]] = defaultdict(list)
    for w in latest.values():
        start = period_start(w.start, period)
        groups[(start, w.meter, w.aggregation, w.customer_id, w.group_key)].append(w)
    out = {}
    for key, ws in groups.items():
        agg = key[2]
        if agg in ("sum", "count"):
            value = sum((w.value for w in ws), Decimal(0))
        elif agg == "max":
            value = max(w.value for w in ws)
        elif agg == "min":
            value = min(w.value for w in ws)
        elif agg == "unique_count":
            value = Decimal(len(set().union(*(w.distinct for w in ws))))
        else:
            value = max(ws, key=lambda w: (w.latest_ts, w.latest_key.encode())).value
        out[key] = (value, sum(w.event_count for w in ws), len(ws))
    return out


def view_rows(ch: ClickHouse, view: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    rows = ch.query_rows(
        "SELECT toUnixTimestamp64Milli(period_start), meter, aggregation, customer_id, group_key,"
        f" value, event_count, windows FROM {view}"
    )
    out = {}
    for start, meter, agg, cust, group, value, count, windows in rows:
        key = (int(start), meter, agg, cust, group)
        assert key not in out, f"duplicate row in {view}: {key}"
        out[key] = (value, count, windows)
    return out


def usage_rows(ch: ClickHouse, customers: Iterable[str], period: str | None, **kw: Any) -> dict:
    out = {}
    for customer in customers:
        for r in q.usage(ch, q.UsageQuery(customer, period=period, **kw)):  # type: ignore[arg-type]
            start = r.get("period_start_ms")
            key = (start, r["meter"], r["aggregation"], r["customer_id"], r["group_key"])
            out[key] = (r["value"], r["event_count"], r["windows"])
    return out


JAN31_22 = ms(2024, 1, 31, 22)
EU = '{"region":"eu"}'


def known_windows() -> list[W]:
    """Every aggregation; several versions (inserted out of order); two days, two months."""
    h = [JAN31_22 + i * HOUR for i in range(4)]  # Jan 31 22:00, 23:00, Feb 1 00:00, 01:00
    u, fs = "unique_count", frozenset

    def lt(start: int, value: Decimal, ts: int, key: str) -> W:
        return W("plan", "latest", "c1", "{}", start, start + HOUR, value, 1, 1, fs(), ts, key)

    feb2 = ms(2024, 2, 2, 10)
    ws = [
        # sum: v1 superseded by v3; v2 arrives last and must lose to v3
        W("tokens", "sum", "c1", "{}", h[0], h[0] + HOUR, Decimal("1.5"), 1, 1),
        W("tokens", "sum", "c1", "{}", h[0], h[0] + HOUR, Decimal("10.25"), 4, 3),
        W("tokens", "sum", "c1", "{}", h[1], h[1] + HOUR, Decimal("0.000000001"), 1, 1),
        W("tokens", "sum", "c1", "{}", h[2], h[2] + HOUR, Decimal("7"), 2, 1),
        W("tokens", "sum", "c1", "{}", feb2, feb2 + HOUR, Decimal("-2.5"), 1, 1),
        W("tokens", "sum", "c1", EU, h[0], h[0] + HOUR, Decimal("100"), 9, 1),
        W("tokens", "sum", "c2", "{}", h[3], h[3] + HOUR, Decimal("3.333333333"), 3, 2),
        # count
        W("calls", "count", "c1", "{}", h[0], h[0] + HOUR, Decimal(3), 3, 1),
        W("calls", "count", "c1", "{}", h[1], h[1] + HOUR, Decimal(5), 5, 2),
        W("calls", "count", "c1", "{}", h[2], h[2] + HOUR, Decimal(1), 1, 1),
        # max / min
        W("peak", "max", "c1", "{}", h[0], h[0] + HOUR, Decimal("9.5"), 2, 1),
        W("peak", "max", "c1", "{}", h[0], h[0] + HOUR, Decimal("12"), 3, 2),
        W("peak", "max", "c1", "{}", h[1], h[1] + HOUR, Decimal("11"), 1, 1),
        W("peak", "max", "c1", "{}", h[2], h[2] + HOUR, Decimal("4"), 1, 1),
        W("low", "min", "c1", "{}", h[0], h[0] + HOUR, Decimal("-1"), 2, 1),
        W("low", "min", "c1", "{}", h[1], h[1] + HOUR, Decimal("-3.75"), 2, 1),
        W("low", "min", "c1", "{}", h[2], h[2] + HOUR, Decimal("0.5"), 1, 1),
        # unique_count: overlapping distinct values across windows
        W("seats", u, "c1", "{}", h[0], h[0] + HOUR, Decimal(2), 2, 1, fs("ab")),
        W("seats", u, "c1", "{}", h[0], h[0] + HOUR, Decimal(3), 4, 2, fs("abx")),
        W("seats", u, "c1", "{}", h[1], h[1] + HOUR, Decimal(2), 2, 1, fs("bc")),
        W("seats", u, "c1", "{}", h[2], h[2] + HOUR, Decimal(3), 3, 1, fs("acd")),
        W("seats", u, "c1", "{}", h[3], h[3] + HOUR, Decimal(1), 1, 1, fs("d")),
        # latest: a tie on latest_ts across windows -> greater key (bytewise) wins
        lt(h[0], Decimal(5), h[1] - 1, "k-b"),
        lt(h[1], Decimal(6), h[1] - 1, "k-a"),
        lt(h[2], Decimal(8), h[2] + 5, "k-B"),
        lt(h[3], Decimal(9), h[2] + 5, "k-a"),
        # a day-window meter: appears at its own window start in the hourly view
        W("storage", "max", "c1", "{}", ms(2024, 1, 31), ms(2024, 2, 1), Decimal(40), 2, 1),
        W("storage", "max", "c1", "{}", ms(2024, 2, 1), ms(2024, 2, 2), Decimal(30), 2, 1),
    ]  # fmt: skip
    return ws


def insert_windows(ch: ClickHouse, windows: list[W]) -> None:
    # several inserts so versions of one window live in different parts (no merge yet)
    for version in sorted({w.version for w in windows}, reverse=True):
        rows = [w.row() for w in windows if w.version == version]
        ch.insert(METER_WINDOWS, rows, METER_WINDOWS_COLUMNS)


@pytest.mark.parametrize("view", ["meter_usage_hourly", "meter_usage_daily", "meter_usage_monthly"])
def test_views_equal_the_python_reference(db: ClickHouse, view: str) -> None:
    windows = known_windows()
    insert_windows(db, windows)
    period = {"meter_usage_hourly": "hour", "meter_usage_daily": "day"}.get(view, "month")
    expected = reference(windows, period)
    assert view_rows(db, view) == expected
    union = {k: v for k, v in view_rows(db, f"meter_usage WHERE period = '{period}'").items()}
    assert union == expected
    # the same after background merges have collapsed the versions
    db.command("OPTIMIZE TABLE meter_windows FINAL")
    assert view_rows(db, view) == expected


def test_known_values_spot_checks(db: ClickHouse) -> None:
    insert_windows(db, known_windows())
    daily = view_rows(db, "meter_usage_daily")
    jan31, feb1 = ms(2024, 1, 31), ms(2024, 2, 1)
    assert daily[(jan31, "tokens", "sum", "c1", "{}")] == (Decimal("10.250000001"), 5, 2)
    assert daily[(jan31, "seats", "unique_count", "c1", "{}")] == (Decimal(4), 6, 2)  # a b x c
    assert daily[(feb1, "seats", "unique_count", "c1", "{}")] == (Decimal(3), 4, 2)  # a c d
    assert daily[(jan31, "plan", "latest", "c1", "{}")][0] == Decimal(5)  # tie: k-b > k-a
    assert daily[(feb1, "plan", "latest", "c1", "{}")][0] == Decimal(9)  # tie: k-a > k-B
    monthly = view_rows(db, "meter_usage_monthly")
    assert monthly[(ms(2024, 1, 1), "peak", "max", "c1", "{}")][0] == Decimal(12)
    assert monthly[(ms(2024, 2, 1), "seats", "unique_count", "c1", "{}")][0] == Decimal(3)
    hourly = view_rows(db, "meter_usage_hourly")
    assert hourly[(jan31, "storage", "max", "c1", "{}")] == (Decimal(40), 2, 1)


def test_usage_equals_the_views(db: ClickHouse) -> None:
    windows = known_windows()
    insert_windows(db, windows)
    customers = sorted({w.customer_id for w in windows})
    for period, view in q.VIEW_NAMES.items():
        assert usage_rows(db, customers, period) == view_rows(db, view)
    # period=None over February equals the monthly view's February rows
    feb = {
        k[1:]: v for k, v in view_rows(db, "meter_usage_monthly").items() if k[0] == ms(2024, 2, 1)
    }
    whole = usage_rows(db, customers, None, from_ms=ms(2024, 2, 1), to_ms=ms(2024, 3, 1))
    assert {k[1:]: v for k, v in whole.items()} == feb
    # and over the whole range equals the reference with no period
    assert usage_rows(db, customers, None) == reference(windows, None)
    only = q.usage(
        db, q.UsageQuery("c1", meter="seats", from_ms=JAN31_22, to_ms=JAN31_22 + 2 * HOUR)
    )
    assert [(r["meter"], r["value"], r["windows"]) for r in only] == [("seats", Decimal(4), 2)]


def test_latest_windows(db: ClickHouse) -> None:
    insert_windows(db, known_windows())
    rows = q.latest_windows(
        db, meter="tokens", customer_id="c1", start_ms=JAN31_22, end_ms=JAN31_22 + HOUR
    )
    assert [(r["group_key"], r["value"], r["version"], r["event_count"]) for r in rows] == [
        (EU, Decimal(100), 1, 9),  # '{"...' sorts before '{}' bytewise
        ("{}", Decimal("10.25"), 3, 4),
    ]
    assert rows[1]["window_start_ms"] == JAN31_22 and rows[1]["window_end_ms"] == JAN31_22 + HOUR
    seats = q.latest_windows(db, meter="seats")
    assert seats[0]["distinct_values"] == ["a", "b", "x"]
    plan = q.latest_windows(db, meter="plan", start_ms=JAN31_22, end_ms=JAN31_22 + HOUR)
    assert (plan[0]["latest_ts_ms"], plan[0]["latest_key"]) == (JAN31_22 + HOUR - 1, "k-b")
    assert len(q.latest_windows(db)) == len(
        {(w.meter, w.customer_id, w.group_key, w.start) for w in known_windows()}
    )


_AGGS = ["sum", "count", "max", "min", "unique_count", "latest"]


@st.composite
def random_windows(draw: st.DrawFn) -> list[W]:
    out = []
    for _ in range(draw(st.integers(1, 25))):
        agg = draw(st.sampled_from(_AGGS))
        start = JAN31_22 + draw(st.integers(-30, 30)) * HOUR
        out.append(
            W(
                f"m_{agg}",
                agg,
                draw(st.sampled_from(["c1", "c2"])),
                draw(st.sampled_from(["{}", EU])),
                start,
                start + HOUR,
                Decimal(draw(st.integers(-(10**12), 10**12))) / 1000,
                draw(st.integers(0, 50)),
                draw(st.integers(1, 4)),
                frozenset(draw(st.lists(st.sampled_from("abcdefg"), max_size=4)))
                if agg == "unique_count"
                else frozenset(),
                start + draw(st.integers(0, 3)) if agg == "latest" else 0,
                draw(st.sampled_from(["k1", "k2", "K2", "k10"])) if agg == "latest" else "",
            )
        )
    # one row per (window, version): a real aggregator never reuses a version
    unique = {(w.meter, w.customer_id, w.group_key, w.start, w.version): w for w in out}
    return list(unique.values())


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(windows=random_windows())
def test_views_match_reference_for_random_windows(db: ClickHouse, windows: list[W]) -> None:
    db.command("TRUNCATE TABLE meter_windows")
    insert_windows(db, windows)
    for period, view in q.VIEW_NAMES.items():
        assert view_rows(db, view) == reference(windows, period)


# ---------------------------------------------------------------- writer and record queries


def event(key: str, customer: str = "c1", ts: int = JAN31_22, **props: Any) -> UsageEvent:
    return UsageEvent("api_call", customer, key, ts, props or {"tokens": Decimal("1.10")})


class AckLostOnce:
    """Inserts; the first insert then fails as if its acknowledgement was lost (a timeout
    after the write)."""

    def __init__(self, ch: ClickHouse) -> None:
        self.ch = ch
        self.lost = 0

    def insert(self, *args: Any, **kwargs: Any) -> None:
        self.ch.insert(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            raise ClickHouseError("Timeout: the server may have written the block", 159)

    def close(self) -> None:
        pass  # the fixture's connection


def test_retried_insert_leaves_no_duplicates(db: ClickHouse) -> None:
    """The worker's inserts (pipeline/worker/app.py, ``_insert``): one insert token per call
    (``writer.call_token``), kept by ClickHouseIO's retries of that call."""
    events = [event(f"k{i:03d}", ts=JAN31_22 + i * 10 * 60_000) for i in range(50)]  # 2 months
    counted = {(e.customer_id, e.idempotency_key): ["api_calls"] for e in events}
    usage, usage_columns = usage_event_rows(events, 1, counted, {})
    rejected = [rejected_row(Rejection(Reason.INVALID_JSON, f"bad {i}", b"{"), 2) for i in range(7)]
    flaky = AckLostOnce(db)
    calls = ClickHouseIO(flaky, Metrics(), max_backoff=0.05)  # type: ignore[arg-type]

    async def insert(table: str, rows: list[tuple[Any, ...]], columns: Iterable[str]) -> None:
        token = call_token(table, rows)
        await calls.call(lambda ch: ch.insert(table, rows, list(columns), dedup_token=token))

    async def insert_both() -> None:
        await insert(USAGE_EVENTS, usage, usage_columns)
        await insert(REJECTED_EVENTS, rejected, REJECTED_EVENTS_COLUMNS)

    asyncio.run(insert_both())
    calls.close()
    assert flaky.lost == 1  # the first insert wrote, failed, and was retried: nothing lost
    # raw row counts, no FINAL: the retry was dropped (insert deduplication: the call's
    # token; the retried block is also identical, so its hash alone would match too)
    assert db.query_rows("SELECT count() FROM usage_events") == [(50,)]
    assert db.query_rows("SELECT count() FROM rejected_events") == [(7,)]
    assert q.rejected_counts(db) == {"invalid_json": 7}


def test_dedup_token_is_what_drops_the_retry(db: ClickHouse) -> None:
    rows = [(datetime(2024, 1, 1, tzinfo=UTC), "too_late", "x", "{}", "c", "k", "")]
    cols = ["received_at", "reason", "detail", "raw", "customer_id", "idempotency_key", "meter"]
    db.insert(REJECTED_EVENTS, rows, cols, dedup_token="tok-1")
    db.insert(REJECTED_EVENTS, rows, cols, dedup_token="tok-1")
    assert db.query_rows("SELECT count() FROM rejected_events") == [(1,)]
    db.insert(REJECTED_EVENTS, rows, cols, dedup_token="tok-2")
    assert db.query_rows("SELECT count() FROM rejected_events") == [(2,)]


def test_existing_keys_and_events_in_range(db: ClickHouse) -> None:
    quoted = "o'brien\\x"
    events = [
        event("k1", tokens=Decimal("0.1000000000000000001")),
        event("k2", ts=JAN31_22 + HOUR),
        event(quoted, customer="c'2", ts=JAN31_22 + 5),
        UsageEvent("other", "c1", "k3", JAN31_22 + 7, {}),
    ]
    db.insert(USAGE_EVENTS, [usage_event_row(e, 1) for e in events], USAGE_EVENTS_COLUMNS)
    # the same key again (a replay with a later ingested_at): a second row until merged
    db.insert(USAGE_EVENTS, [usage_event_row(events[0], 2)], USAGE_EVENTS_COLUMNS)
    assert db.query_rows("SELECT count() FROM usage_events") == [(5,)]

    found = q.existing_keys(db, [("c1", "k1"), ("c'2", quoted), ("c1", "nope"), ("c2", "k1")])
    fingerprints = [usage_event_row(e, 0)[5] for e in events]
    assert found == {("c1", "k1"): fingerprints[0], ("c'2", quoted): fingerprints[2]}
    assert q.existing_keys(db, []) == {}

    got = q.events_in_range(db, ["c1", "c'2"], ["api_call"], JAN31_22, JAN31_22 + HOUR)
    assert [UsageEvent(**row) for row in got] == [events[2], events[0]]
    assert got[1]["properties"] == {"tokens": Decimal("0.1000000000000000001")}
    assert got[1]["timestamp_ms"] == JAN31_22 and got[1]["fingerprint"] == fingerprints[0]
    everything = q.events_in_range(db, ["c1"], None, JAN31_22, JAN31_22 + 2 * HOUR)
    assert [r["idempotency_key"] for r in everything] == ["k1", "k2", "k3"]
    assert q.events_in_range(db, ["c1"], [], 0, 2**40) == []


def test_existing_keys_is_one_query_for_2000_pairs(db: ClickHouse, monkeypatch: Any) -> None:
    events = [event(f"01J{i:023d}", customer=f"cus_{i % 40}") for i in range(2000)]
    db.insert(USAGE_EVENTS, [usage_event_row(e, 1) for e in events[::2]], USAGE_EVENTS_COLUMNS)
    calls: list[str] = []
    original = db.query_rows

    def spy(sql: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(sql)
        return original(sql, *args, **kwargs)

    monkeypatch.setattr(db, "query_rows", spy)
    found = q.existing_keys(db, [(e.customer_id, e.idempotency_key) for e in events])
    assert len(calls) == 1
    assert len(found) == 1000
    assert set(found) == {(e.customer_id, e.idempotency_key) for e in events[::2]}


def test_datetimes_come_back_aware_utc(db: ClickHouse) -> None:
    db.insert(USAGE_EVENTS, [usage_event_row(event("k"), JAN31_22 + 1)], USAGE_EVENTS_COLUMNS)
    [(ts, ingested)] = db.query_rows("SELECT timestamp, ingested_at FROM usage_events")
    assert ts == datetime(2024, 1, 31, 22, tzinfo=UTC)
    assert ingested == datetime(2024, 1, 31, 22, 0, 0, 1000, tzinfo=UTC)
    [row] = db.query_dicts("SELECT toUnixTimestamp64Milli(timestamp) AS t FROM usage_events")
    assert row == {"t": JAN31_22}


def _driver_only(db: ClickHouse, monkeypatch: Any) -> list[str]:
    """Record which inserts took the JSON block path: inline in the INSERT on chdb (one
    engine call, no temporary file), the driver's ``raw_insert`` on a server."""
    taken: list[str] = []
    raw_insert = db._client.raw_insert
    inline = client_module.inline_insert
    expected = "inline" if db.backend == "chdb" else "raw_insert"

    def spy_raw(table: str, *args: Any, **kwargs: Any) -> Any:
        assert expected == "raw_insert", f"{table}: raw_insert on {db.backend}"
        taken.append(table)
        return raw_insert(table, *args, **kwargs)

    def spy_inline(table: str, *args: Any, **kwargs: Any) -> bytes:
        assert expected == "inline", f"{table}: inline insert on {db.backend}"
        taken.append(table)
        return inline(table, *args, **kwargs)

    monkeypatch.setattr(db._client, "raw_insert", spy_raw)
    monkeypatch.setattr(client_module, "inline_insert", spy_inline)
    return taken


def test_inline_insert_takes_only_plain_names_and_values() -> None:
    sql = client_module.inline_insert(
        "t", ["a", "b"], {"insert_deduplicate": 1, "insert_deduplication_token": "t-2-ab_c"}, b"[]"
    )
    assert sql == (
        b"INSERT INTO `t` (`a`, `b`) SETTINGS insert_deduplicate = '1',"
        b" insert_deduplication_token = 't-2-ab_c' FORMAT JSONCompactColumns\n[]"
    )
    for bad_value in ("x' FORMAT", "a b", "x\\", "x\n"):
        with pytest.raises(ValueError, match="not a plain value"):
            client_module.inline_insert("t", ["a"], {"s": bad_value}, b"[]")
    with pytest.raises(ValueError, match="not a plain identifier"):
        client_module.inline_insert("t; DROP TABLE x", ["a"], {}, b"[]")
    with pytest.raises(ValueError, match="not a plain identifier"):
        client_module.inline_insert("t", ["a"], {"s = 1, readonly": 0}, b"[]")


def test_json_columns_store_what_the_driver_stores(db: ClickHouse, monkeypatch: Any) -> None:
    """The same rows through the JSON block and through the driver's Native path read
    back identical, value for value, for the edge values of every hot column type."""
    odd = 'q"uo\\te\n\u2028\u0000\t é😀'
    taken = _driver_only(db, monkeypatch)

    def events(prefix: str) -> list[UsageEvent]:
        return [
            event(f"{prefix}k1", tokens=Decimal("0.1000000000000000001")),
            event(f"{prefix}{odd}", customer=odd, ts=0, note=odd),
            event(f"{prefix}k3", ts=9_999_999_999_999, n=Decimal("-1E-9")),
        ]

    def windows(meter: str) -> list[tuple[Any, ...]]:
        unique = WindowState(2, distinct={odd, ""})
        latest = WindowState(1, Decimal("12345.5"), latest_ts=5, latest_key=odd)
        return [
            meter_window_row(
                meter,
                "sum",
                "c1",
                "{}",
                0,
                DAY,
                WindowState(3),
                2**63 - 1,
                1,
                value=Decimal("1E-9"),
            ),
            meter_window_row(
                meter,
                "unique_count",
                odd,
                odd,
                JAN31_22,
                JAN31_22 + DAY,
                unique,
                7,
                JAN31_22,
                value=Decimal("-99999999999999999999999999999.999999999"),
            ),
            meter_window_row(
                meter,
                "latest",
                "c3",
                "{}",
                JAN31_22,
                JAN31_22 + HOUR,
                latest,
                3,
                JAN31_22,
                value=Decimal("12345.5"),
            ),
        ]

    db.insert(USAGE_EVENTS, [usage_event_row(e, 1) for e in events("j-")], USAGE_EVENTS_COLUMNS)
    db.insert(METER_WINDOWS, windows("json"), METER_WINDOWS_COLUMNS)
    assert taken == [USAGE_EVENTS, METER_WINDOWS]
    driver = db._client.insert  # clickhouse-connect's own Native serialization
    driver(USAGE_EVENTS, [usage_event_row(e, 1) for e in events("d-")], list(USAGE_EVENTS_COLUMNS))
    driver(METER_WINDOWS, windows("driver"), list(METER_WINDOWS_COLUMNS))
    assert taken == [USAGE_EVENTS, METER_WINDOWS]

    def record(prefix: str) -> list[tuple[Any, ...]]:
        return db.query_rows(
            "SELECT substring(idempotency_key, 3) AS key, * EXCEPT idempotency_key"
            f" FROM usage_events WHERE startsWith(idempotency_key, '{prefix}') ORDER BY key"
        )

    def stored_windows(meter: str) -> list[tuple[Any, ...]]:
        return db.query_rows(
            f"SELECT * EXCEPT meter FROM meter_windows WHERE meter = '{meter}' ORDER BY aggregation"
        )

    assert len(record("j-")) == 3
    assert record("j-") == record("d-")
    assert len(stored_windows("json")) == 3
    assert stored_windows("json") == stored_windows("driver")
    [(ts, note)] = db.query_rows(
        "SELECT timestamp, JSONExtractString(properties, 'note') FROM usage_events"
        " WHERE customer_id = {odd:String} AND startsWith(idempotency_key, 'j-')",
        {"odd": odd},
    )
    assert (ts, note) == (datetime(1970, 1, 1, tzinfo=UTC), odd)


def test_dates_bools_and_nullables_store_what_the_driver_stores(
    db: ClickHouse, monkeypatch: Any
) -> None:
    """Date, Bool and Nullable columns (priced_usage_runs.day, credit_grants.expires_at,
    credit_recharge.enabled, ...) through the JSON block read back as through the driver."""
    db.command(
        "CREATE TABLE typed (k String, day Date, on Bool,"
        " expires Nullable(DateTime64(3, 'UTC')), n Nullable(Int64), s Nullable(String),"
        " amount Nullable(Decimal(76, 30))) ENGINE = MergeTree ORDER BY k"
    )
    taken = _driver_only(db, monkeypatch)
    rows = [
        ("a", date(2026, 12, 1), True, None, -(2**63), None, Decimal("1E-30")),
        ("b", date(1970, 1, 1), False, datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
         None, 'q"\n', None),
        ("c", date(2149, 6, 6), True, datetime(2024, 1, 31, 22, tzinfo=UTC), 2**63 - 1, "", None),
    ]  # fmt: skip
    names = ["k", "day", "on", "expires", "n", "s", "amount"]
    db.insert("typed", [("j" + r[0], *r[1:]) for r in rows], names)
    assert taken == ["typed"]
    db._client.insert("typed", [("d" + r[0], *r[1:]) for r in rows], column_names=names)

    def stored(prefix: str) -> list[tuple[Any, ...]]:
        return db.query_rows(
            "SELECT substring(k, 2) AS key, * EXCEPT k FROM typed"
            f" WHERE startsWith(k, '{prefix}') ORDER BY key"
        )

    assert stored("j") == stored("d")
    assert [r[1:] for r in stored("j")] == [
        (date(2026, 12, 1), True, None, -(2**63), None, Decimal("1E-30")),
        (date(1970, 1, 1), False, datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
         None, 'q"\n', None),
        (date(2149, 6, 6), True, datetime(2024, 1, 31, 22, tzinfo=UTC), 2**63 - 1, "", None),
    ]  # fmt: skip


def test_a_pricing_run_is_written_as_a_json_block(db: ClickHouse, monkeypatch: Any) -> None:
    """Its ``day`` column once sent it down the driver's path (pandas imported on the
    worker's ClickHouse thread, ~1.6 s holding the GIL, at the first run)."""
    taken = _driver_only(db, monkeypatch)
    row = ("acme", datetime(2026, 12, 1, tzinfo=UTC), 1, date(2026, 12, 3), "tokens", "metered",
           datetime(2026, 12, 1, tzinfo=UTC), "usd", Decimal("10"), Decimal("25"),
           Decimal("0.025"))  # fmt: skip
    pricing.write_priced_usage(db, [row])
    assert taken == [pricing.PRICED_USAGE_RUNS]
    assert db.query_rows("SELECT day, amount FROM priced_usage_runs") == [
        (date(2026, 12, 3), Decimal("0.025"))
    ]


def test_rows_json_cannot_carry_go_through_the_driver(db: ClickHouse, monkeypatch: Any) -> None:
    taken = _driver_only(db, monkeypatch)
    before_1970 = datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)
    rows = [(before_1970, "too_late", "x", "{}", "c", "k", "")]
    cols = ["received_at", "reason", "detail", "raw", "customer_id", "idempotency_key", "meter"]
    db.insert(REJECTED_EVENTS, rows, cols)
    assert taken == []
    assert db.query_rows("SELECT received_at FROM rejected_events") == [(before_1970,)]
    db.insert(REJECTED_EVENTS, [(datetime(2024, 1, 1, tzinfo=UTC), *rows[0][1:])], cols)
    assert taken == [REJECTED_EVENTS]


def test_a_table_changed_by_ddl_is_described_again(db: ClickHouse) -> None:
    rows = [(datetime(2024, 1, 1, tzinfo=UTC), "too_late", "x", "{}", "c", "k", "")]
    cols = ["received_at", "reason", "detail", "raw", "customer_id", "idempotency_key", "meter"]
    db.insert(REJECTED_EVENTS, rows, cols)
    db.command("ALTER TABLE rejected_events ADD COLUMN amount Decimal(38, 9)")
    db.insert(REJECTED_EVENTS, [(*rows[0], Decimal("2.5"))], [*cols, "amount"])
    assert db.query_rows("SELECT amount FROM rejected_events ORDER BY amount") == [
        (Decimal(0),),
        (Decimal("2.5"),),
    ]


# ---------------------------------------------------------------- read-only analyst queries


def analyst(ch: ClickHouse) -> AnalystSQL:
    """Analyst SQL on this connection's engine, with the default limits."""
    return AnalystSQL(ch, SqlLimits())


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO rejected_events (reason) VALUES ('x')",
        "DROP TABLE usage_events",
        "ALTER TABLE usage_events DELETE WHERE 1",
        "CREATE TABLE evil (a UInt8) ENGINE = Memory",
        "TRUNCATE TABLE usage_events",
        "SELECT 1; DROP TABLE usage_events",
    ],
)
def test_readonly_query_refuses_writes(db: ClickHouse, sql: str) -> None:
    with pytest.raises(ClickHouseError) as info:
        analyst(db).query(sql)
    assert info.value.code == 164
    assert db.query_rows("EXISTS TABLE usage_events") == [(1,)]


def test_readonly_is_enforced_by_clickhouse_too(db: ClickHouse) -> None:
    # these pass the statement guard; the engine's readonly=1 refuses them
    for sql in (
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    ):
        with pytest.raises(ClickHouseError) as info:
            analyst(db).query(sql)
        assert info.value.code == 164, sql
    columns, rows = analyst(db).query("SELECT count() AS n, 'x' AS s FROM usage_events")
    assert (columns, rows) == (["n", "s"], [(0, "x")])
    # the writer's session is untouched: writes still work
    db.insert(USAGE_EVENTS, [usage_event_row(event("k"), 1)], USAGE_EVENTS_COLUMNS)
    assert analyst(db).query("SELECT count() FROM usage_events")[1] == [(1,)]


def test_errors_keep_the_clickhouse_code(db: ClickHouse) -> None:
    with pytest.raises(ClickHouseError) as info:
        db.query_rows("SELECT * FROM no_such_table")
    assert info.value.code == 60
    with pytest.raises(ClickHouseError) as info:
        db.command("SELECT throwIf(1, 'boom')")
    assert info.value.code == 395


def test_a_second_connection_sees_the_migrated_database(
    db: ClickHouse, ch_factory: Callable[..., ClickHouse]
) -> None:
    other = ch_factory(db.database)
    assert other.query_rows("SELECT count() FROM schema_migrations") == [(len(MIGRATIONS),)]
    assert migrate(other) == []


def test_a_lane_of_calls_writes_on_its_own_thread_and_connection(
    db: ClickHouse, ch_factory: Callable[..., ClickHouse], tmp_path: Path
) -> None:
    """``ClickHouseIO.lane`` (the credit ledger's writes): a thread and a writable
    connection of its own, whose rows the main connection reads at once, retried through
    the same injected outage, closed with its parent."""
    down = tmp_path / "clickhouse-down"
    calls = ClickHouseIO(ch_factory(db.database), Metrics(), max_backoff=0.05, down_file=down)
    lane = calls.lane("credits")
    assert calls.lane("credits") is lane

    def where(ch: ClickHouse) -> tuple[str, int]:
        return threading.current_thread().name, id(ch)

    rejected = [rejected_row(Rejection(Reason.INVALID_JSON, f"bad {i}", b"{"), 2) for i in range(3)]

    async def run() -> tuple[tuple[str, int], tuple[str, int], bool]:
        main, own = await calls.call(where), await lane.call(where)
        down.touch()  # an outage: the lane's write waits for it to end, loses nothing
        write = asyncio.ensure_future(
            lane.call(lambda ch: ch.insert(REJECTED_EVENTS, rejected, REJECTED_EVENTS_COLUMNS))
        )
        await asyncio.sleep(0.3)
        waited = not write.done()
        down.unlink()
        await write
        return main, own, waited

    main, own, waited = asyncio.run(run())
    assert main[0].startswith("clickhouse_") and own[0].startswith("clickhouse-credits_")
    assert main[1] != own[1]  # another connection
    assert waited
    assert q.rejected_counts(db) == {"invalid_json": 3}  # seen by another connection
    calls.close()
    with pytest.raises(RuntimeError):  # the lane's thread is shut down with its parent
        asyncio.run(lane.call(where))
