"""The effective record and a correction's effect on it, as pure functions.

The record (``usage_events``) is never changed: a correction adds rows to
``event_corrections`` (one per event: ``void`` or ``amend`` with the new properties),
and every count reads the *effective* record: voided events left out, amended events
with their new properties. The latest correction of an event wins (greatest
(corrected_at, correction_id)). ClickHouse computes the same thing for the worker's
reads (sinks/clickhouse/queries.py ``effective_events_sql``, the ``usage_events_effective``
view); :func:`effective` is it in Python, for the dry-run's "after" and for tests.

The dry-run (:func:`diff`) folds the events of the affected windows twice, with the
meters' own fold (meters/fold.recompute_windows): as the record is now and as it would be
after the correction, and lists every window and every (customer, meter, month) whose
total changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal, NamedTuple

from meterstream.corrections.request import Correction
from meterstream.events import UsageEvent, loads_exact
from meterstream.meters import fold
from meterstream.meters.aggregation import WindowState
from meterstream.meters.config import MetersConfig
from meterstream.meters.windows import period_label

Action = Literal["void", "amend"]
EventId = tuple[str, str]
"""(customer_id, idempotency_key)"""


class EventCorrection(NamedTuple):
    """One row of ``event_corrections``."""

    customer_id: str
    idempotency_key: str
    correction_id: str
    action: Action
    properties: str  # amend: canonical JSON; void: ""
    corrected_at_ms: int


def latest(rows: Iterable[EventCorrection]) -> dict[EventId, EventCorrection]:
    """The correction that wins for each event: greatest (corrected_at, correction_id)."""
    out: dict[EventId, EventCorrection] = {}
    for row in rows:
        eid = (row.customer_id, row.idempotency_key)
        cur = out.get(eid)
        if cur is None or (row.corrected_at_ms, row.correction_id) > (
            cur.corrected_at_ms,
            cur.correction_id,
        ):
            out[eid] = row
    return out


def amended(event: UsageEvent, properties_json: str) -> UsageEvent:
    """``event`` with its properties replaced (key, time, fingerprint unchanged: a copy of
    the original arriving later is still a duplicate of it)."""
    return dataclasses.replace(
        event, properties=loads_exact(properties_json), properties_json=properties_json
    )


def effective(
    events: Iterable[UsageEvent], corrections: Mapping[EventId, EventCorrection]
) -> list[UsageEvent]:
    """The events as every count reads them: voided ones out, amended ones amended."""
    out = []
    for event in events:
        fix = corrections.get((event.customer_id, event.idempotency_key))
        if fix is None:
            out.append(event)
        elif fix.action == "amend":
            out.append(amended(event, fix.properties))
    return out


def selected(
    correction: Correction, meters: MetersConfig, events: Iterable[UsageEvent]
) -> list[UsageEvent]:
    """The events of the effective record a correction applies to (``events``: the
    effective record's candidates, as the worker read them)."""
    if correction.by_keys:
        wanted = {(k.customer_id, k.idempotency_key) for k in correction.keys}
        return [e for e in events if (e.customer_id, e.idempotency_key) in wanted]
    holds = correction.selects(meters)
    return [e for e in events if holds(e)]


def planned(
    correction: Correction, correction_id: str, events: Sequence[UsageEvent], at_ms: int
) -> list[EventCorrection]:
    """The ``event_corrections`` rows a correction writes for its selected events."""
    props = {(k.customer_id, k.idempotency_key): k.properties for k in correction.keys}
    return [
        EventCorrection(
            e.customer_id,
            e.idempotency_key,
            correction_id,
            correction.kind,
            (props.get((e.customer_id, e.idempotency_key)) or "")
            if correction.kind == "amend"
            else "",
            at_ms,
        )
        for e in events
    ]


def windows_affected(
    meters: MetersConfig, before: Iterable[UsageEvent], after: Iterable[UsageEvent]
) -> set[fold.WindowKey]:
    """Every window (and customer-total key) the events fall in, before and after (an
    amendment may move an event to another group or out of a meter's filter)."""
    return fold.windows_of(meters, before, totals=True) | fold.windows_of(
        meters, after, totals=True
    )


def _state_doc(meters: MetersConfig, meter: str, state: WindowState) -> dict[str, Any]:
    value = meters.aggregators[meter].result(state)
    return {"value": str(value), "event_count": state.event_count}


def quantities(
    meters: MetersConfig,
    states: Mapping[fold.WindowKey, WindowState],
    customer_id: str,
    meter_names: Iterable[str],
    start_ms: int,
    end_ms: int,
) -> dict[str, Decimal]:
    """Per meter of ``meter_names``, the customer's value over windows starting in
    [start_ms, end_ms), all groups merged (the invoice's quantity of a plan segment)."""
    aggs = meters.aggregators
    merged = {name: aggs[name].start() for name in meter_names}
    for key, state in states.items():
        if (
            key.customer_id == customer_id
            and key.meter in merged
            and not key.is_total
            and start_ms <= key.window_start_ms < end_ms
        ):
            merged[key.meter] = aggs[key.meter].merge(merged[key.meter], state)
    return {name: aggs[name].result(state) for name, state in merged.items()}


def months_affected(keys: Iterable[fold.WindowKey]) -> set[tuple[str, str, str]]:
    """(customer_id, meter, "YYYY-MM") of each window: the totals a correction changes."""
    return {(k.customer_id, k.meter, period_label(k.window_start_ms)) for k in keys}


def diff(
    meters: MetersConfig,
    keys: Iterable[fold.WindowKey],
    before: Sequence[UsageEvent],
    after: Sequence[UsageEvent],
) -> dict[str, list[dict[str, Any]]]:
    """Before and after of every window of ``keys`` (customer totals left out) and of
    every (customer, meter, month) they fall in, from the two records by the meters' fold;
    only what changes is listed. ``before``/``after`` must hold every event of those
    months of those customers (the month totals are folded from them)."""
    wanted = {k for k in keys if not k.is_total}
    months = months_affected(wanted)
    states_before = fold.fold(meters, before)
    states_after = fold.fold(meters, after)
    aggs = meters.aggregators
    windows = []
    for key in sorted(wanted):
        agg = aggs[key.meter]
        b = states_before.get(key) or agg.start()
        a = states_after.get(key) or agg.start()
        db, da = _state_doc(meters, key.meter, b), _state_doc(meters, key.meter, a)
        if db == da:
            continue
        start, end = meters.by_name(key.meter).window_bounds(key.window_start_ms)
        windows.append(
            {
                "customer_id": key.customer_id,
                "meter": key.meter,
                "group_key": key.group_key,
                "window_start_ms": start,
                "window_end_ms": end,
                "period": period_label(start),
                "before": db,
                "after": da,
            }
        )
    merged: dict[tuple[str, str, str], list[WindowState]] = {m: [] for m in months}
    merged_after: dict[tuple[str, str, str], list[WindowState]] = {m: [] for m in months}
    for states, into in ((states_before, merged), (states_after, merged_after)):
        for key, state in states.items():
            month = (key.customer_id, key.meter, period_label(key.window_start_ms))
            if month in into:
                into[month].append(state)
    totals = []
    for month in sorted(months):
        customer, meter, period = month
        agg = aggs[meter]
        total_b, total_a = agg.start(), agg.start()
        for state in merged[month]:
            total_b = agg.merge(total_b, state)
        for state in merged_after[month]:
            total_a = agg.merge(total_a, state)
        db, da = _state_doc(meters, meter, total_b), _state_doc(meters, meter, total_a)
        if db == da:
            continue
        totals.append(
            {
                "customer_id": customer,
                "meter": meter,
                "period": period,
                "before": db,
                "after": da,
                "change": str(Decimal(da["value"]) - Decimal(db["value"])),
            }
        )
    return {"windows": windows, "periods": totals}
