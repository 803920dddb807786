"""The first two steps of a batch, as pure functions (pipeline/meters/fold.py has the rest).

1. :func:`decode_batch` - every record becomes a ``UsageEvent`` or a ``Rejection``.
2. :func:`resolve_duplicates` - given what the dedup table and the record
   (ClickHouse ``usage_events``) already know of the batch's keys, split the
   events into fresh ones, exact duplicates, idempotency conflicts, and events
   that are in the record but not in the dedup table (a previous run inserted
   them and stopped before counting them, or the table was lost): those
   windows are recomputed from the record rather than incremented.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from meterstream.dedup.key import DedupKey
from meterstream.events import Reason, Rejection, UsageEvent, parse_event


class SourceRecord(NamedTuple):
    value: bytes
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None = None  # the Kafka record key (customer_id, by contract)


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
            key=record.key,
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
    excluded: Collection[DedupKey] = (),
) -> DedupResult:
    """Classify a batch in arrival order.

    ``counted`` maps keys found in the dedup table to their fingerprint (those
    events are in the windows); ``recorded`` maps keys found in the record only;
    ``excluded``: keys of ``recorded`` set aside as unprocessable (no meter counts
    them), whose copies are duplicates (or conflicts), never counted.
    """
    result = DedupResult()
    winner: dict[DedupKey, str] = {}
    for event in events:
        key = DedupKey.of(event)
        known = winner.get(key)
        if known is None:
            known = counted.get(key)
        if known is None and excluded and key in excluded:
            known = recorded.get(key)
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
