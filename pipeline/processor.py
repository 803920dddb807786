"""What one batch of records does, as pure functions (no Kafka, no ClickHouse).

The Faust agent (pipeline/app.py) calls these in order:

1. :func:`decode_batch` - every record becomes a ``UsageEvent`` or a ``Rejection``.
2. :func:`resolve_duplicates` - given what the dedup table and the record
   (ClickHouse ``usage_events``) already know of the batch's keys, split the
   events into fresh ones, exact duplicates, idempotency conflicts, and events
   that are in the record but not in the dedup table (a previous run inserted
   them and stopped before counting them, or the table was lost): those
   windows are recomputed from the record rather than incremented.
3. :func:`contributions` - fold the fresh events into per-window partial states
   (one state per window key per batch), dead-lettering values a meter cannot
   read (``invalid_value``; the event still counts for its other meters).
4. :func:`recompute_windows` - rebuild window states exactly from record events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from pipeline.aggregation import WindowState
from pipeline.dedup import DedupKey, json_key
from pipeline.events import Reason, Rejection, UsageEvent, parse_event
from pipeline.meters import InvalidValue, Meter, MetersConfig


class SourceRecord(NamedTuple):
    value: bytes
    partition: int
    offset: int
    timestamp_ms: int


class WindowKey(NamedTuple):
    """One series window: the unit of state, of a ClickHouse row and of a table key."""

    meter: str
    customer_id: str
    group_key: str
    window_start_ms: int

    def encode(self) -> bytes:
        """The windows table key (JSON text, UTF-8)."""
        return json_key(list(self))

    @classmethod
    def decode(cls, text: bytes | str) -> WindowKey:
        meter, customer_id, group_key, start = orjson.loads(text)
        return cls(meter, customer_id, group_key, int(start))


def decode_batch(
    records: Iterable[SourceRecord], *, now_ms: int, horizon_ms: int
) -> tuple[list[tuple[SourceRecord, UsageEvent]], list[Rejection]]:
    events: list[tuple[SourceRecord, UsageEvent]] = []
    rejections: list[Rejection] = []
    for record in records:
        parsed = parse_event(
            record.value,
            record_timestamp_ms=record.timestamp_ms,
            now_ms=now_ms,
            horizon_ms=horizon_ms,
        )
        if isinstance(parsed, Rejection):
            rejections.append(parsed)
        else:
            events.append((record, parsed))
    return events, rejections


@dataclass
class DedupResult:
    fresh: list[UsageEvent] = field(default_factory=list)
    recorded_uncounted: list[UsageEvent] = field(default_factory=list)
    duplicates: list[UsageEvent] = field(default_factory=list)
    conflicts: list[Rejection] = field(default_factory=list)


def _conflict(event: UsageEvent) -> Rejection:
    return Rejection(
        Reason.IDEMPOTENCY_CONFLICT,
        "same idempotency_key as an event already counted, different content; "
        "the first copy counts",
        event.to_json().encode(),
        event.customer_id,
        event.idempotency_key,
    )


def resolve_duplicates(
    events: Sequence[UsageEvent],
    counted: Mapping[DedupKey, str],
    recorded: Mapping[DedupKey, str],
) -> DedupResult:
    """Classify a batch in arrival order.

    ``counted`` maps keys found in the dedup table to their fingerprint (those
    events are in the windows); ``recorded`` maps keys found in the record only.
    """
    result = DedupResult()
    winner: dict[DedupKey, str] = {}
    for event in events:
        key = DedupKey.of(event)
        known = winner.get(key)
        if known is None:
            known = counted.get(key)
        if known is not None:
            if known == event.fingerprint:
                result.duplicates.append(event)
            else:
                result.conflicts.append(_conflict(event))
            winner[key] = known
            continue
        in_record = recorded.get(key)
        winner[key] = in_record if in_record is not None else event.fingerprint
        if in_record is None:
            result.fresh.append(event)
        elif in_record == event.fingerprint:
            result.recorded_uncounted.append(event)
        else:
            result.conflicts.append(_conflict(event))
    return result


_new_tuple = tuple.__new__


def window_key(meter: Meter, event: UsageEvent) -> WindowKey:
    start, _ = meter.window_bounds(event.timestamp_ms)
    # tuple.__new__ directly: WindowKey's generated __new__ is a Python call per key
    return _new_tuple(WindowKey, (meter.name, event.customer_id, meter.group_key(event), start))


@dataclass
class Contributions:
    """What a batch of fresh events adds to the windows."""

    states: dict[WindowKey, WindowState] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    counted_by: dict[DedupKey, list[str]] = field(default_factory=dict)
    # windows of matching events whose value the meter could not read (not in states)
    invalid_windows: set[WindowKey] = field(default_factory=set)

    @property
    def unmetered(self) -> int:
        return sum(1 for names in self.counted_by.values() if not names)


def contributions(meters: MetersConfig, events: Iterable[UsageEvent]) -> Contributions:
    """Partial window states from ``events``, the invalid_value rejections, and
    the meters that counted each event (empty: it matched no meter)."""
    out = Contributions()
    states, counted_by, aggs = out.states, out.counted_by, meters.aggregators
    for event in events:
        counted = counted_by[DedupKey.of(event)] = []
        for meter in meters.for_event_name(event.event_name):
            if not meter.matches(event):
                continue
            key = window_key(meter, event)
            try:
                value = meter.extract(event)
            except InvalidValue as exc:
                out.invalid_windows.add(key)
                out.rejections.append(
                    Rejection(
                        Reason.INVALID_VALUE,
                        str(exc),
                        event.to_json().encode(),
                        event.customer_id,
                        event.idempotency_key,
                        meter=meter.name,
                    )
                )
                continue
            agg = aggs[meter.name]
            state = states.get(key)
            if state is None:
                state = states[key] = agg.start()
            states[key] = agg.add(state, value, event.timestamp_ms, event.idempotency_key)
            counted.append(meter.name)
    return out


def windows_of(meters: MetersConfig, events: Iterable[UsageEvent]) -> set[WindowKey]:
    """Every window the events fall in, for every meter they match."""
    return {
        window_key(meter, event)
        for event in events
        for meter in meters.for_event_name(event.event_name)
        if meter.matches(event)
    }


def recompute_windows(
    meters: MetersConfig, keys: Iterable[WindowKey], record: Iterable[UsageEvent]
) -> dict[WindowKey, WindowState]:
    """Exact states of ``keys`` from the record's events (the source of truth).

    ``record`` must hold every recorded event of those windows; events of other
    windows are ignored. Values a meter cannot read are skipped, as they were
    dead-lettered when first seen.
    """
    wanted = set(keys)
    aggs = meters.aggregators
    states = {key: aggs[key.meter].start() for key in wanted}
    for event in record:
        for meter in meters.for_event_name(event.event_name):
            if not meter.matches(event):
                continue
            key = window_key(meter, event)
            if key not in wanted:
                continue
            try:
                value = meter.extract(event)
            except InvalidValue:
                continue
            agg = aggs[meter.name]
            states[key] = agg.add(states[key], value, event.timestamp_ms, event.idempotency_key)
    return states


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
