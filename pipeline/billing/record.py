"""The record is the source of truth: recompute windows from it, compare, repair.

Used before every Stripe forward (verify closed windows) and by
``meterstream reconcile``. The recomputation runs the same pure meter and
aggregation code as the worker over the deduplicated raw events in
``usage_events``, so "what the record says" and "what the worker says" can
only differ if the worker lost or missed state.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from meterstream.events import UsageEvent
from meterstream.meters.aggregation import WindowState, aggregator_for
from meterstream.meters.config import Meter, MetersConfig
from meterstream.meters.diff import (
    DiffScope,
    MetersDiff,
    diff_meters,
    event_names,
    recompute_preview,
)
from meterstream.meters.fold import WindowKey, fold
from meterstream.meters.windows import DAY_MS, day_of
from meterstream.sinks.clickhouse import queries, writer
from meterstream.sinks.clickhouse.client import ClickHouse


@dataclass(frozen=True)
class Difference:
    key: WindowKey
    stored_value: Decimal | None
    stored_count: int | None
    record_value: Decimal
    record_count: int

    def describe(self) -> str:
        k = self.key
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(k.window_start_ms / 1000))
        return (
            f"{k.meter} customer={k.customer_id} group={k.group_key} window={start}: "
            f"stored {self.stored_value} ({self.stored_count} events), "
            f"record {self.record_value} ({self.record_count} events)"
        )


class RecordRead(NamedTuple):
    """A meter's windows computed from the record, and the record's events of the
    meter's event name per (customer, UTC day start)."""

    states: dict[WindowKey, WindowState]
    days: Counter[tuple[str, int]]


def read_record(
    ch: ClickHouse,
    meters: MetersConfig,
    meter: Meter,
    start_ms: int,
    end_ms: int,
    customers: Sequence[str] | None = None,
) -> RecordRead:
    """Every window of ``meter`` with events in [start, end), computed from the record
    (of ``customers`` only, when given), and the record's events of the meter's event
    name per (customer, UTC day), matching the meter or not.

    The one fold (:func:`meterstream.meters.fold.fold`), as a rebuild: the meters an
    event's record row says refused it do not count it (its window is there, empty, as
    for a value the meter cannot read), and an event set aside as unprocessable counts
    for none."""
    rows = queries.events_in_range(ch, customers, [meter.event_name], start_ms, end_ms)
    return fold_record(meters, meter, rows)


def fold_record(meters: MetersConfig, meter: Meter, rows: Iterable[dict[str, Any]]) -> RecordRead:
    """:func:`read_record` of rows already read (``queries.events_in_range`` rows; pure)."""
    # One pass over the rows as they come (a full read of a busy period is hundreds
    # of thousands of events, read while the worker runs), counted per day on the way.
    days: Counter[tuple[str, int]] = Counter()

    def counted_per_day(rows: Iterable[dict[str, Any]]) -> Iterator[UsageEvent]:
        for row in rows:
            event = UsageEvent(**row)
            days[(event.customer_id, day_of(event.timestamp_ms))] += 1
            yield event

    states = fold(meters, counted_per_day(rows), meter=meter, empty_windows=True)
    return RecordRead(states, days)


class RecordSnapshot(NamedTuple):
    """What a reconciliation reads of [start, end), in one visit: the record's raw rows
    (``queries.events_in_range_sql``) and the stored windows' (value, event count)."""

    rows: list[Sequence[Any]]
    stored: dict[WindowKey, tuple[Decimal, int]]


def record_snapshot(
    ch: ClickHouse,
    meter: Meter,
    start_ms: int,
    end_ms: int,
    customers: Sequence[str] | None = None,
) -> RecordSnapshot:
    """The two reads of :func:`reconcile_meter`, nothing folded: the Stripe verifier reads
    them under the record lock and folds them after releasing it (the fold is most of a
    reconciliation's time, and the batch waits on that lock)."""
    rows: list[Sequence[Any]] = []
    if customers is None or customers:
        sql = queries.events_in_range_sql(customers, [meter.event_name], start_ms, end_ms)
        rows = ch.query_plain_rows(sql)
    return RecordSnapshot(rows, stored_states(ch, meter, start_ms, end_ms, customers))


def reconcile_snapshot(
    meters: MetersConfig, meter: Meter, snapshot: RecordSnapshot
) -> tuple[list[Difference], dict[WindowKey, WindowState], Counter[tuple[str, int]]]:
    """:func:`reconcile_meter` without the repair, of a :func:`record_snapshot` (pure)."""
    record, days = fold_record(meters, meter, map(queries.event_fields, snapshot.rows))
    return compare(meter, record, snapshot.stored), record, days


def stored_states(
    ch: ClickHouse,
    meter: Meter,
    start_ms: int,
    end_ms: int,
    customers: Sequence[str] | None = None,
) -> dict[WindowKey, tuple[Decimal, int]]:
    rows = queries.latest_windows(
        ch, meter=meter.name, start_ms=start_ms, end_ms=end_ms, customer_ids=customers
    )
    return {
        WindowKey(r["meter"], r["customer_id"], r["group_key"], r["window_start_ms"]): (
            Decimal(r["value"]),
            int(r["event_count"]),
        )
        for r in rows
    }


def compare(
    meter: Meter,
    record: dict[WindowKey, WindowState],
    stored: dict[WindowKey, tuple[Decimal, int]],
) -> list[Difference]:
    agg = aggregator_for(meter.aggregation)
    diffs = []
    for key in sorted(set(record) | set(stored)):
        state = record.get(key) or agg.start()
        value, count = agg.result(state), state.event_count
        have = stored.get(key)
        if have is None and count == 0:
            continue
        if have is None or have != (value, count):
            stored_value, stored_count = have if have is not None else (None, None)
            diffs.append(Difference(key, stored_value, stored_count, value, count))
    return diffs


def repair(
    ch: ClickHouse,
    meters: MetersConfig,
    record: dict[WindowKey, WindowState],
    diffs: list[Difference],
) -> int:
    """Write the record's state of each differing window as its newest version."""
    if not diffs:
        return 0
    version = time.time_ns()
    now_ms = version // 1_000_000
    rows = []
    for diff in diffs:
        meter = meters.by_name(diff.key.meter)
        agg = aggregator_for(meter.aggregation)
        state = record.get(diff.key) or agg.start()
        start, end = meter.window_bounds(diff.key.window_start_ms)
        rows.append(
            writer.meter_window_row(
                meter.name,
                meter.aggregation,
                diff.key.customer_id,
                diff.key.group_key,
                start,
                end,
                state,
                version,
                now_ms,
                value=agg.result(state),
            )
        )
    ch.insert(writer.METER_WINDOWS, rows, column_names=list(writer.METER_WINDOWS_COLUMNS))
    return len(rows)


def reconcile_meter(
    ch: ClickHouse,
    meters: MetersConfig,
    meter: Meter,
    start_ms: int,
    end_ms: int,
    *,
    fix: bool,
    customers: Sequence[str] | None = None,
) -> tuple[list[Difference], dict[WindowKey, WindowState], Counter[tuple[str, int]]]:
    """Differences between stored windows and the record for windows in [start, end)
    (of ``customers`` only, when given); the record's states and its events per
    (customer, day) (:func:`read_record`)."""
    snapshot = record_snapshot(ch, meter, start_ms, end_ms, customers)
    diffs, record, days = reconcile_snapshot(meters, meter, snapshot)
    if fix:
        repair(ch, meters, record, diffs)
    return diffs, record, days


def diff_from_record(
    ch: ClickHouse, old: MetersConfig, new: MetersConfig, scope: DiffScope
) -> MetersDiff:
    """``meterstream meters diff``: the record's events of the scope's [start, end)
    (widened to whole UTC days, so every window is whole) under both definitions
    (:func:`meterstream.meters.diff.diff_meters`, the one fold)."""
    start_ms = day_of(scope.start_ms)
    end_ms = day_of(scope.end_ms - 1) + DAY_MS
    customers = None if scope.customer is None else [scope.customer]
    names = event_names(old, new, scope.meter)
    rows = queries.events_in_range(ch, customers, names, start_ms, end_ms)
    events = (UsageEvent(**row) for row in rows)
    return diff_meters(old, new, events, meter=scope.meter, by_window=scope.by_window)


def recompute_preview_from_record(
    ch: ClickHouse,
    meters: MetersConfig,
    meter: str,
    start_ms: int,
    end_ms: int,
    *,
    customer: str | None = None,
    by_window: bool = False,
) -> MetersDiff:
    """``meterstream meters recompute --dry-run``: ``meter``'s windows of [start, end)
    (widened to whole windows) as stored against the same windows from the record under
    ``meters`` (:func:`meterstream.meters.diff.recompute_preview`)."""
    m = meters.by_name(meter)
    lo, _ = m.window_bounds(start_ms)
    _, hi = m.window_bounds(end_ms - 1)
    customers = None if customer is None else [customer]
    stored = queries.latest_windows(ch, meter=meter, start_ms=lo, end_ms=hi, customer_ids=customers)
    rows = queries.events_in_range(ch, customers, [m.event_name], lo, hi)
    return recompute_preview(
        meters, meter, stored, (UsageEvent(**row) for row in rows), by_window=by_window
    )
