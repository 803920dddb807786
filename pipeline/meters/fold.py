"""What one batch of records does, as pure functions (no Kafka, no ClickHouse).

A batch of the worker (pipeline/worker/batch.py) calls these in order:

1. :func:`~meterstream.dedup.resolve.decode_batch` - every record becomes a
   ``UsageEvent`` or a ``Rejection`` (pipeline/dedup/resolve.py).
2. :func:`~meterstream.dedup.resolve.resolve_duplicates` - given what the dedup table
   and the record (ClickHouse ``usage_events``) already know of the batch's keys, split the
   events into fresh ones, exact duplicates, idempotency conflicts, and events
   that are in the record but not in the dedup table (a previous run inserted
   them and stopped before counting them, or the table was lost): those
   windows are recomputed from the record rather than incremented.
3. :func:`contributions` - fold the fresh events into per-window partial states
   (one state per window key per batch), dead-lettering values a meter cannot
   read (``invalid_value``; the event still counts for its other meters).
4. :func:`recompute_windows` - rebuild window states exactly from record events,
   honouring what the record says each event was refused for.
5. :func:`enforce_limits` - given each touched window's state before the batch
   (the table's, or rebuilt from the record), refuse, in arrival order, every
   event that would take a running total of a sum meter out of the meter's range
   (``invalid_value``, naming the meter); the window keeps its last good state.

Why range decisions are exact and the same on every rebuild: a decision is taken
once, live, for a fresh event against the exact running total (the window's state
before the batch, then the batch's accepted events in arrival order), and it is
written with the event into the record (``usage_events.refused_meters``) before the
record insert returns. Every later computation of the window - a rebuild from the
record (:func:`recompute_windows`), ``meterstream reconcile``, the Stripe
forwarder's verification (pipeline/billing/record.py) - reads the decision instead of
re-deriving it, so the order the record returns events in (not arrival order) does
not matter: every aggregation is order-insensitive over a fixed set of events.
A replayed batch finds its events in the record and takes no new decision.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final, NamedTuple

import orjson

from meterstream.dedup.key import DedupKey, json_key
from meterstream.errors import InvalidValue
from meterstream.events import ALL_METERS, Reason, Rejection, UsageEvent
from meterstream.meters.aggregation import EXACT, WindowState
from meterstream.meters.config import Meter, MetersConfig

ALL_GROUPS: Final = "*"
"""The ``group_key`` of a customer-total key: the customer's window total over every
group of a meter that :attr:`~meterstream.meters.config.Meter.guards_customer_total`. It lives in
the windows table next to the group windows (same window start, same rebuilds) and is
never written to ``meter_windows``; a real group key is a JSON object, never ``*``."""

_ZERO: Final = Decimal(0)


class WindowKey(NamedTuple):
    """One series window: the unit of state, of a ClickHouse row and of a table key."""

    meter: str
    customer_id: str
    group_key: str
    window_start_ms: int

    @property
    def is_total(self) -> bool:
        """A customer-total key (:data:`ALL_GROUPS`), not a window of ``meter_windows``."""
        return self.group_key == ALL_GROUPS

    def encode(self) -> bytes:
        """The windows table key (JSON text, UTF-8)."""
        return json_key(list(self))

    @classmethod
    def decode(cls, text: bytes | str) -> WindowKey:
        meter, customer_id, group_key, start = orjson.loads(text)
        return cls(meter, customer_id, group_key, int(start))


_new_tuple = tuple.__new__


def window_key(meter: Meter, event: UsageEvent) -> WindowKey:
    start, _ = meter.window_bounds(event.timestamp_ms)
    # tuple.__new__ directly: WindowKey's generated __new__ is a Python call per key
    return _new_tuple(WindowKey, (meter.name, event.customer_id, meter.group_key(event), start))


def total_key(key: WindowKey) -> WindowKey:
    """The customer-total key (:data:`ALL_GROUPS`) of a group window's meter and window."""
    return _new_tuple(WindowKey, (key.meter, key.customer_id, ALL_GROUPS, key.window_start_ms))


def total_keys(meters: MetersConfig, keys: Iterable[WindowKey]) -> set[WindowKey]:
    """The customer-total keys of ``keys`` (group windows of meters that keep one)."""
    guarded = {meter.name for meter in meters.meters if meter.guards_customer_total}
    if not guarded:
        return set()
    return {total_key(key) for key in keys if key.meter in guarded and not key.is_total}


Series = tuple[str, str, int]
"""(meter, customer_id, window_start_ms): the windows one range decision looks at."""


@dataclass
class Contributions:
    """What a batch of fresh events adds to the windows."""

    states: dict[WindowKey, WindowState] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    counted_by: dict[DedupKey, list[str]] = field(default_factory=dict)
    # windows of matching events whose value the meter could not read (not in states)
    invalid_windows: set[WindowKey] = field(default_factory=set)
    # sum meters: the greatest and least value the batch adds (enforce_limits' bound)
    sum_high: dict[str, Decimal] = field(default_factory=dict)
    sum_low: dict[str, Decimal] = field(default_factory=dict)
    # meters that refused an event because a total would have left the range
    refused: dict[DedupKey, list[str]] = field(default_factory=dict)

    @property
    def unmetered(self) -> int:
        return sum(1 for names in self.counted_by.values() if not names)


def contributions(meters: MetersConfig, events: Iterable[UsageEvent]) -> Contributions:
    """Partial window states from ``events``, the invalid_value rejections, and
    the meters that counted each event (empty: it matched no meter): :func:`fold`
    of the live batch.

    Range decisions on running totals need the windows' states before the batch:
    they are taken afterwards by :func:`enforce_limits`, which also adds the
    customer-total keys."""
    out = Contributions()
    out.states = fold(meters, events, live=out)
    return out


def fold(
    meters: MetersConfig,
    events: Iterable[UsageEvent],
    *,
    wanted: Collection[WindowKey] | None = None,
    meter: Meter | None = None,
    exclude: Collection[DedupKey] = (),
    empty_windows: bool = False,
    live: Contributions | None = None,
) -> dict[WindowKey, WindowState]:
    """The fold of events into window states: the one place that says which event
    counts for which window, used by the live batch (:func:`contributions`), the
    rebuild from the record (:func:`recompute_windows`) and the record's read for
    verification and ``meterstream reconcile`` (pipeline/billing/record.py).

    Every event counts, for every meter it matches, in that meter's window, except:
    an event set aside as unprocessable (``refused_meters`` holds ``*``), the meters
    its record row says refused it, a value the meter cannot read (dead-lettered
    ``invalid_value`` when first seen), and the events of ``exclude`` (a batch being
    isolated: events it inserted that are not yet counted). Fresh events carry no
    refusals (a producer never sets them), so the live batch counts them all.

    ``wanted``: only these windows and customer-total keys (each one there, empty
    when nothing counts for it), every other window ignored. ``meter``: only this
    meter's windows. ``empty_windows``: a window an event matches is there even when
    the event's value does not count (refused, or unreadable). ``live``: the batch's
    other outcomes, collected as it folds: the meters that counted each event, the
    ``invalid_value`` rejections and their windows, and each sum meter's greatest and
    least value (the bound of :func:`enforce_limits`).
    """
    aggs, for_event_name = meters.aggregators, meters.for_event_name
    states = {} if wanted is None else {key: aggs[key.meter].start() for key in wanted}
    counted_by = None if live is None else live.counted_by
    high: dict[str, Decimal] | None = None  # live: each sum meter's greatest value
    low: dict[str, Decimal] = {}  # and least
    if live is not None:
        high, low = live.sum_high, live.sum_low
    counted: list[str] | None = None
    for event in events:
        refused = event.refused_meters
        if refused and ALL_METERS in refused:
            continue
        if exclude and DedupKey.of(event) in exclude:
            continue
        if counted_by is not None:
            counted = counted_by[DedupKey.of(event)] = []
        if meter is None:
            candidates = for_event_name(event.event_name)
        else:
            candidates = (meter,) if event.event_name == meter.event_name else ()
        for m in candidates:
            if not m.matches(event):
                continue
            key = window_key(m, event)
            tkey = None
            if wanted is not None and m.guards_customer_total:
                tkey = total_key(key)
                if key not in wanted and tkey not in wanted:
                    continue
            elif wanted is not None and key not in wanted:
                continue
            name = m.name
            agg = aggs[name]
            if empty_windows and key not in states:
                states[key] = agg.start()
            if refused and name in refused:
                continue
            try:
                value = m.extract(event)
            except InvalidValue as exc:
                if live is not None:
                    _invalid_value(live, m, event, key, exc)
                continue
            if tkey is None:  # the window alone (live, read, or a rebuild's window)
                state = states.get(key)
                if state is None:
                    state = states[key] = agg.start()
                states[key] = agg.add(state, value, event.timestamp_ms, event.idempotency_key)
            else:  # a rebuild of a window and/or its customer total
                for target in (key, tkey):
                    if target in wanted:  # type: ignore[operator]
                        states[target] = agg.add(
                            states[target], value, event.timestamp_ms, event.idempotency_key
                        )
            if counted is not None:
                counted.append(name)
            if high is not None and agg.kind == "sum":  # a Decimal: enforce_limits' bound
                top = high.get(name)
                if top is None or value > top:  # type: ignore[operator]
                    high[name] = value  # type: ignore[assignment]
                bottom = low.get(name)
                if bottom is None or value < bottom:  # type: ignore[operator]
                    low[name] = value  # type: ignore[assignment]
    return states


def _invalid_value(
    live: Contributions, meter: Meter, event: UsageEvent, key: WindowKey, exc: InvalidValue
) -> None:
    """A fresh event's value ``meter`` cannot read: dead-lettered ``invalid_value``
    naming the meter (the event still counts for its other meters)."""
    live.invalid_windows.add(key)
    live.rejections.append(
        Rejection(
            Reason.INVALID_VALUE,
            str(exc),
            event.to_json().encode(),
            event.customer_id,
            event.idempotency_key,
            meter=meter.name,
        )
    )


def enforce_limits(
    meters: MetersConfig,
    contrib: Contributions,
    bases: Mapping[WindowKey, WindowState],
    events: Iterable[UsageEvent],
) -> None:
    """Refuse every fresh event that would take a running total of a sum meter out of
    its range (pipeline/meters/config.py, "Ranges"), in arrival order; updates ``contrib``,
    adding the customer-total keys of meters that keep them.

    ``bases`` holds the state before this batch of every window (and customer-total
    key) of ``contrib.states`` that has one (absent: empty); ``events`` are the fresh
    events ``contrib`` was computed from, in arrival order. A refused event is taken
    out of that meter's windows (the window keeps its last good state), out of
    ``counted_by``, listed in ``refused`` (for the record) and dead-lettered
    ``invalid_value`` naming the meter; it still counts for its other meters.

    Cheap unless a total comes near the limit: a window whose base plus its batch
    event count times the batch's largest |value| stays inside cannot leave the range
    whatever the order, so only the other series are folded again, event by event.
    """
    if not contrib.sum_high:
        return
    states = contrib.states
    events = list(events)
    count_digits = len(str(len(events)))  # every key's event count is below 10^this
    # Per sum meter of the batch: its limit, the batch's largest |value|, and the
    # exponent below which the batch's part of any one running total stays (n < 10^d
    # events of |value| < 10^e: below 10^(d + e)).
    bounds: dict[str, tuple[Decimal, Decimal, int, int]] = {}
    for name, top in contrib.sum_high.items():
        limit = meters.by_name(name).limit
        largest = max(top.copy_abs(), contrib.sum_low[name].copy_abs())
        bounds[name] = (limit, largest, limit.adjusted(), largest.adjusted() + 1 + count_digits)
    sum_keys = [key for key in states if key.meter in bounds]
    guarded = {name for name in bounds if meters.by_name(name).guards_customer_total}
    if guarded:
        totals: dict[WindowKey, WindowState] = {}
        for key in sum_keys:
            if key.meter in guarded:
                state, tkey = states[key], total_key(key)
                total = totals.get(tkey)
                if total is None:
                    totals[tkey] = WindowState(state.event_count, state.value)
                else:
                    total.event_count += state.event_count
                    total.value = EXACT.add(total.value or _ZERO, state.value or _ZERO)
        states.update(totals)
        sum_keys += totals
    flagged: set[Series] = set()
    for key in sum_keys:
        limit, largest, limit_exp, batch_exp = bounds[key.meter]
        base = bases.get(key)
        value = None if base is None else base.value
        # fast and sound: |base| < 10^a and the batch's part < 10^b, so the running
        # total stays below 10^(max(a, b) + 1) <= limit whatever the order
        base_exp = 0 if not value else value.adjusted() + 1
        if max(base_exp, batch_exp) < limit_exp:
            continue
        room = EXACT.subtract(limit, _magnitude(base))
        if EXACT.multiply(largest, states[key].event_count) >= room:
            flagged.add((key.meter, key.customer_id, key.window_start_ms))
    if flagged:
        _refold(meters, contrib, flagged, bases, events)


def _magnitude(state: WindowState | None) -> Decimal:
    return _ZERO if state is None or state.value is None else state.value.copy_abs()


def _refold(
    meters: MetersConfig,
    contrib: Contributions,
    flagged: set[Series],
    bases: Mapping[WindowKey, WindowState],
    events: Iterable[UsageEvent],
) -> None:
    """The flagged series' events again, in arrival order, one by one against the
    running totals of their window and (if kept) their customer total."""
    aggs = meters.aggregators
    running: dict[WindowKey, Decimal] = {}
    accepted: dict[WindowKey, WindowState] = {}
    touched: set[WindowKey] = set()
    for event in events:
        for meter in meters.for_event_name(event.event_name):
            if (meter.name, event.customer_id, meter.window_bounds(event.timestamp_ms)[0]) not in (
                flagged
            ) or not meter.matches(event):
                continue
            if meter.name in contrib.refused.get(DedupKey.of(event), ()):
                continue
            try:
                value = meter.extract(event)
            except InvalidValue:
                continue
            assert isinstance(value, Decimal)
            key = window_key(meter, event)
            targets = (key, total_key(key)) if meter.guards_customer_total else (key,)
            touched.update(targets)
            limit = meter.limit
            after = []
            for target in targets:
                current = running.get(target)
                if current is None:
                    base = bases.get(target)
                    current = _ZERO if base is None or base.value is None else base.value
                after.append(EXACT.add(current, value))
            over = next((i for i, total in enumerate(after) if total.copy_abs() >= limit), None)
            if over is not None:
                _refuse(meter, contrib, event, targets[over], value, after[over])
                continue
            agg = aggs[meter.name]
            for target, total in zip(targets, after, strict=True):
                running[target] = total
                state = accepted.get(target)
                if state is None:
                    state = accepted[target] = agg.start()
                agg.add(state, value, event.timestamp_ms, event.idempotency_key)
    for key in touched:
        if key in accepted:
            contrib.states[key] = accepted[key]
        else:
            contrib.states.pop(key, None)


def _refuse(
    meter: Meter,
    contrib: Contributions,
    event: UsageEvent,
    key: WindowKey,
    value: Decimal,
    total: Decimal,
) -> None:
    dkey = DedupKey.of(event)
    contrib.counted_by[dkey].remove(meter.name)
    contrib.refused.setdefault(dkey, []).append(meter.name)
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.window_start_ms / 1000))
    what = (
        "the customer's total over all groups"
        if key.is_total
        else "the window total" + ("" if key.group_key == "{}" else f" of group {key.group_key}")
    )
    path = meter.definition_at(event.timestamp_ms)[1]  # the value path of the event's time
    contrib.rejections.append(
        Rejection(
            Reason.INVALID_VALUE,
            f"meter {meter.name!r}: {path} {value} would take {what} in the window "
            f"from {start} to {total}: {meter.range_text()}; not counted by this meter",
            event.to_json().encode(),
            event.customer_id,
            event.idempotency_key,
            meter=meter.name,
        )
    )


def windows_of(
    meters: MetersConfig, events: Iterable[UsageEvent], *, totals: bool = False
) -> set[WindowKey]:
    """Every window the events fall in, for every meter they match (``totals``: and
    the customer-total keys of meters that keep one)."""
    out: set[WindowKey] = set()
    for event in events:
        for meter in meters.for_event_name(event.event_name):
            if meter.matches(event):
                key = window_key(meter, event)
                out.add(key)
                if totals and meter.guards_customer_total:
                    out.add(total_key(key))
    return out


def recompute_windows(
    meters: MetersConfig,
    keys: Iterable[WindowKey],
    record: Iterable[UsageEvent],
    exclude: Collection[DedupKey] = (),
) -> dict[WindowKey, WindowState]:
    """Exact states of ``keys`` (windows and customer-total keys) from the record's
    events (the source of truth): :func:`fold` of the record.

    ``record`` must hold every recorded event of those windows; events of other
    windows are ignored. Values a meter cannot read are skipped, as they were
    dead-lettered when first seen; so are the meters an event's record row says
    refused it (``refused_meters``; all of them for an unprocessable event), and the
    events of ``exclude`` (a batch being isolated: events it inserted that are not
    yet counted).
    """
    return fold(meters, record, wanted=set(keys), exclude=exclude)


def merge_into(
    meters: MetersConfig,
    current: Mapping[WindowKey, WindowState],
    deltas: Mapping[WindowKey, WindowState],
) -> dict[WindowKey, WindowState]:
    """New states for the keys in ``deltas``: current merged with the delta."""
    merged: dict[WindowKey, WindowState] = {}
    aggs = meters.aggregators
    for key, delta in deltas.items():
        agg = aggs[key.meter]
        base = current.get(key)
        merged[key] = delta if base is None else agg.merge(base, delta)
    return merged
