"""What a change of meter definitions does to the totals: ``meterstream meters diff``.

Pure: given two meters configurations and the record's events (``usage_events``, with
the meters that refused each event), the totals per (customer, meter, group, period)
(or per window) under both, computed with the one fold
(:func:`meterstream.meters.fold.fold`), and their difference.

Range decisions (pipeline/meters/fold.py): the record holds, with each event, the
meters that refused it because a running total would have left the meter's range.

- A meter in both files: the recorded decisions are applied under both definitions
  (an event its meter refused stays refused, whatever the definition), and no new
  decision is taken. An event that only the new definition counts has no recorded
  decision and counts; a window whose new total is out of the meter's range is flagged
  (``out_of_range``), never silently kept.
- A meter only in the new file (added): no decision exists for it, so they are taken
  again with :func:`~meterstream.meters.fold.enforce_limits`, the worker's own rule,
  as if every event of the range were one fresh batch over empty windows, in event
  time order (timestamp, then idempotency key: the record does not keep the arrival
  order). ``refused`` counts the events refused so.
- A meter only in the old file (removed): its totals as the record has them, and none
  under the new file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from meterstream.events import ALL_METERS
from meterstream.meters.aggregation import WindowState, aggregator_for
from meterstream.meters.config import Meter, MetersConfig
from meterstream.meters.fold import WindowKey, contributions, enforce_limits, fold
from meterstream.meters.windows import period_label

Status = Literal["changed", "unchanged", "added", "removed", "recompute"]


@dataclass(frozen=True)
class DiffScope:
    """What a meters diff compares: the record's events of [start_ms, end_ms), of one
    customer and one meter when given, totalled per period or per window."""

    start_ms: int
    end_ms: int
    customer: str | None = None
    meter: str | None = None
    by_window: bool = False


@dataclass(frozen=True)
class Total:
    """A total under one definition: the meter's value and the events it counted."""

    value: Decimal
    event_count: int
    out_of_range: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "value": str(self.value),
            "event_count": self.event_count,
            "out_of_range": self.out_of_range,
        }


@dataclass(frozen=True)
class DiffRow:
    """One (customer, meter, group, period or window) under both definitions."""

    customer_id: str
    meter: str
    group_key: str
    period: str
    window_start_ms: int | None
    status: Status
    old: Total | None
    new: Total | None

    @property
    def difference(self) -> Decimal:
        """``new - old`` (a missing side is 0)."""
        return (self.new.value if self.new else Decimal(0)) - (
            self.old.value if self.old else Decimal(0)
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "meter": self.meter,
            "group_key": self.group_key,
            "period": self.period,
            "window_start_ms": self.window_start_ms,
            "status": self.status,
            "old": None if self.old is None else self.old.as_json(),
            "new": None if self.new is None else self.new.as_json(),
            "difference": str(self.difference),
        }


@dataclass(frozen=True)
class MetersDiff:
    """Every row, and per meter its status and (added meters) the events refused now."""

    rows: list[DiffRow]
    meters: dict[str, Status]
    refused: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {
            "meters": dict(sorted(self.meters.items())),
            "refused": dict(sorted(self.refused.items())),
            "rows": [row.as_json() for row in self.rows],
        }


def meter_statuses(
    old: MetersConfig, new: MetersConfig, only: str | None = None
) -> dict[str, Status]:
    """Each meter name of either file: changed, unchanged, added or removed."""
    before = {m.name: m for m in old.meters}
    after = {m.name: m for m in new.meters}
    out: dict[str, Status] = {}
    for name in sorted(set(before) | set(after)):
        if only is not None and name != only:
            continue
        if name not in after:
            out[name] = "removed"
        elif name not in before:
            out[name] = "added"
        else:
            out[name] = "unchanged" if before[name] == after[name] else "changed"
    return out


def event_names(old: MetersConfig, new: MetersConfig, only: str | None = None) -> list[str]:
    """The event names the record must be read for."""
    return sorted(
        {
            m.event_name
            for config in (old, new)
            for m in config.meters
            if only is None or m.name == only
        }
    )


def diff_meters(
    old: MetersConfig,
    new: MetersConfig,
    events: Iterable[Any],
    *,
    meter: str | None = None,
    by_window: bool = False,
) -> MetersDiff:
    """The totals of the record's ``events`` (``UsageEvent``s with their recorded
    ``refused_meters``) under ``old`` and ``new``, per (customer, meter, group, period)
    or, ``by_window``, per window; only ``meter`` when given (module docstring for the
    range decisions)."""
    statuses = meter_statuses(old, new, meter)
    record = list(events)
    kept_old = [old.by_name(n) for n, s in statuses.items() if s != "added"]
    kept_new = [new.by_name(n) for n, s in statuses.items() if s in ("changed", "unchanged")]
    added = [new.by_name(n) for n, s in statuses.items() if s == "added"]
    before = _fold(old, kept_old, record)
    after = _fold(new, kept_new, record)
    refused: dict[str, int] = {}
    if added:
        fresh = MetersConfig(meters=tuple(added))
        # unprocessable events count for no meter (enforce_limits reads live events,
        # which never carry a refusal, so they are left out here)
        ordered = sorted(
            (e for e in record if ALL_METERS not in e.refused_meters),
            key=lambda e: (e.timestamp_ms, e.idempotency_key),
        )
        contrib = contributions(fresh, ordered)
        enforce_limits(fresh, contrib, {}, ordered)
        after.update({k: s for k, s in contrib.states.items() if not k.is_total})
        for names in contrib.refused.values():
            for name in names:
                refused[name] = refused.get(name, 0) + 1
        for m in added:
            refused.setdefault(m.name, 0)
    rows = _rows(statuses, _totals(old, before, by_window), _totals(new, after, by_window))
    return MetersDiff(rows, statuses, refused)


def recompute_preview(
    meters: MetersConfig,
    meter: str,
    stored: Iterable[dict[str, Any]],
    events: Iterable[Any],
    *,
    by_window: bool = False,
) -> MetersDiff:
    """What a recompute of ``meter`` from the record would change: its windows as stored
    (``stored``: the latest version of each window, rows of ``queries.latest_windows``)
    against the same windows folded from the record's ``events`` under ``meters`` (the
    definition valid at each event's time; recorded range decisions applied), per
    period or per window. Status ``recompute`` for every row."""
    m = meters.by_name(meter)
    agg = aggregator_for(m.aggregation)
    before: dict[WindowKey, WindowState] = {}
    for row in stored:
        key = WindowKey(row["meter"], row["customer_id"], row["group_key"], row["window_start_ms"])
        before[key] = agg.load(
            {
                "event_count": row["event_count"],
                "value": None if m.aggregation in ("count", "unique_count") else row["value"],
                "distinct": row["distinct_values"] if m.aggregation == "unique_count" else None,
                "latest_ts": row["latest_ts_ms"] if m.aggregation == "latest" else -1,
                "latest_key": row["latest_key"] if m.aggregation == "latest" else "",
            }
        )
    after = fold(meters, events, meter=m)
    statuses: dict[str, Status] = {meter: "recompute"}
    rows = _rows(statuses, _totals(meters, before, by_window), _totals(meters, after, by_window))
    return MetersDiff(rows, statuses, {})


def _rows(
    statuses: dict[str, Status], old: dict[_RowKey, Total], new: dict[_RowKey, Total]
) -> list[DiffRow]:
    rows = []
    for key in sorted(set(old) | set(new), key=_order):
        customer, name, group, period, start = key
        rows.append(
            DiffRow(
                customer, name, group, period, start, statuses[name], old.get(key), new.get(key)
            )
        )
    return rows


def _fold(
    config: MetersConfig, meters: Sequence[Meter], record: list[Any]
) -> dict[WindowKey, WindowState]:
    if len(meters) == 1:
        return fold(config, record, meter=meters[0])
    names = {m.name for m in meters}  # one pass over the record for all of them
    return {k: s for k, s in fold(config, record).items() if k.meter in names}


_RowKey = tuple[str, str, str, str, int | None]


def _order(key: _RowKey) -> tuple[str, str, str, str, int]:
    customer, name, group, period, start = key
    return customer, name, period, group, -1 if start is None else start


def _totals(
    config: MetersConfig, states: dict[WindowKey, WindowState], by_window: bool
) -> dict[_RowKey, Total]:
    """Window states merged per period (all windows of a UTC month) or kept per window,
    as the period views merge them (pipeline migrations 0005)."""
    merged: dict[_RowKey, WindowState] = {}
    out_of_range: set[_RowKey] = set()
    for key, state in states.items():
        meter = config.by_name(key.meter)
        agg = aggregator_for(meter.aggregation)
        row = (
            key.customer_id,
            key.meter,
            key.group_key,
            period_label(key.window_start_ms),
            key.window_start_ms if by_window else None,
        )
        if agg.kind == "sum" and meter.range_problem(agg.result(state)) is not None:
            out_of_range.add(row)
        have = merged.get(row)
        merged[row] = state if have is None else agg.merge(have, state)
    out = {}
    for row, state in merged.items():
        agg = aggregator_for(config.by_name(row[1]).aggregation)
        out[row] = Total(agg.result(state), state.event_count, row in out_of_range)
    return out
