"""An event's fate: what happened to one idempotency key, from the record and the dead letters.

"Why isn't this event counted?" Pure: given the key's ``usage_events`` rows, its
``rejected_events`` rows (sinks/clickhouse/lookup.py reads both) and the meters file, say
which one of these happened, with the evidence:

- ``counted``: in the record; the meters that counted it, their windows and the value
  each took (and the window's current total);
- ``duplicate``: counted once; exact resends of it came later and were not counted;
- ``conflicting``: counted once; copies with the same key and other content came later
  and were refused (``idempotency_conflict``), each shown;
- ``uncounted``: in the record, but no meter counts it: each meter of its event name
  says why (the filter does not hold; the value is not readable or out of range), or no
  meter reads that event name at all;
- ``rejected``: never counted: every dead-letter reason with every problem (an event set
  aside as ``unprocessable`` is in the record, marked, and counts for no meter);
- ``never_seen``: neither the record nor the dead letters know the key (not sent, sent to
  another customer or topic, or still in flight: a batch is recorded within seconds);
- ``voided``: in the record, voided by a correction (README, "Fixing history"): counted by
  no meter; a copy sent again is a duplicate.

An amended event is answered with its amended properties (what every count reads), and
every answer about a corrected event lists its corrections (``corrections``: who, when,
why, the last one wins).

Every answer about a recorded event lists, for each meter of its event name that did not
count it, why (``not_counted``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

from meterstream.corrections import effective
from meterstream.events import ALL_METERS, Reason, UsageEvent
from meterstream.meters.config import InvalidValue, Meter, MetersConfig
from meterstream.sinks.clickhouse import lookup
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.corrections import key_corrections

FATES: Final = (
    "counted",
    "duplicate",
    "conflicting",
    "uncounted",
    "rejected",
    "never_seen",
    "voided",
)

WindowRef = tuple[str, str, int]
"""(meter, group_key, window_start_ms) of one customer's window."""


def iso(ms: int) -> str:
    """Epoch ms as RFC 3339 UTC with milliseconds."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds")


def counted_event(record: Sequence[Mapping[str, Any]]) -> UsageEvent | None:
    """The copy the record keeps: the first ingested row (an ``unprocessable`` mark
    carries the epoch as ``ingested_at``, so it comes first), as the record's reads take it."""
    return UsageEvent(**record[0]["event"]) if record else None


def windows_of(
    event: UsageEvent, meters: MetersConfig, counted_by: Sequence[str]
) -> list[WindowRef]:
    """The windows the meters in ``counted_by`` put ``event`` in (meters no longer in the
    file are left out)."""
    names = {m.name: m for m in meters.meters}
    refs = []
    for name in counted_by:
        meter = names.get(name)
        if meter is not None:
            refs.append((name, meter.group_key(event), meter.window_bounds(event.timestamp_ms)[0]))
    return refs


def _value_taken(meter: Meter, event: UsageEvent) -> str | None:
    try:
        return str(meter.extract(event))
    except InvalidValue:
        return None


def _counted_lines(
    event: UsageEvent,
    meters: MetersConfig,
    counted_by: Sequence[str],
    windows: Mapping[WindowRef, tuple[Decimal, int]],
) -> list[dict[str, Any]]:
    names = {m.name: m for m in meters.meters}
    lines: list[dict[str, Any]] = []
    for name in counted_by:
        meter = names.get(name)
        if meter is None:
            lines.append({"meter": name, "note": "this meter is no longer in the meters file"})
            continue
        start, end = meter.window_bounds(event.timestamp_ms)
        group = meter.group_key(event)
        now = windows.get((name, group, start))
        lines.append(
            {
                "meter": name,
                "aggregation": meter.aggregation,
                "group_key": group,
                "window_start": iso(start),
                "window_end": iso(end),
                "value_taken": _value_taken(meter, event),
                "window_value": None if now is None else str(now[0]),
                "window_event_count": None if now is None else now[1],
            }
        )
    return lines


def _not_counted_lines(
    event: UsageEvent,
    meters: MetersConfig,
    counted_by: Sequence[str],
    rejected: Sequence[Mapping[str, Any]],
) -> list[dict[str, str]]:
    """Why each meter of the event's name did not count it."""
    refused = {r["meter"]: r["detail"] for r in rejected if r["reason"] == Reason.INVALID_VALUE}
    lines = []
    for meter in meters.for_event_name(event.event_name):
        if meter.name in counted_by:
            continue
        if meter.name in event.refused_meters or meter.name in refused:
            detail = refused.get(meter.name) or "its value would take a total out of range"
            lines.append({"meter": meter.name, "reason": "invalid_value", "detail": detail})
        elif not meter.matches(event):
            lines.append(
                {
                    "meter": meter.name,
                    "reason": "filter",
                    "detail": "the meter's filter does not hold",
                }
            )
        elif _value_taken(meter, event) is None:
            detail = refused.get(meter.name) or "the meter cannot read its value"
            lines.append({"meter": meter.name, "reason": "invalid_value", "detail": detail})
    return lines


def rejection_doc(row: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    """A dead-letter row as the API shows it: when, why, then ``more`` fields."""
    return {
        "received_at": iso(row["received_at_ms"]),
        "reason": row["reason"],
        "detail": row["detail"],
        **more,
    }


def _copy(row: Mapping[str, Any]) -> dict[str, Any]:
    return rejection_doc(row, raw=row["raw"], **({"meter": row["meter"]} if row["meter"] else {}))


def _event_doc(event: UsageEvent, ingested_at_ms: int) -> dict[str, Any]:
    return {
        "event_name": event.event_name,
        "timestamp": iso(event.timestamp_ms),
        "properties": event.properties,
        "key_derived": event.key_derived,
        "recorded_at": iso(ingested_at_ms),
        "json": event.to_json(),
    }


def fate(
    customer_id: str,
    idempotency_key: str,
    record: Sequence[Mapping[str, Any]],
    rejected: Sequence[Mapping[str, Any]],
    rejected_total: int,
    meters: MetersConfig,
    windows: Mapping[WindowRef, tuple[Decimal, int]],
    corrections: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The answer of ``GET /v1/events/{customer_id}/{idempotency_key}``.

    ``record``: the key's usage_events rows, first ingested first (``event``: the
    UsageEvent fields, ``meters``, ``ingested_at_ms``); ``rejected``: its rejected_events
    rows, oldest first (``rejected_total``: how many there are, the list may be cut);
    ``windows``: the current value and event count of the windows the event is in;
    ``corrections``: the event's corrections, oldest first (the last one wins).
    """
    answer: dict[str, Any] = {"customer_id": customer_id, "idempotency_key": idempotency_key}
    duplicates = [r for r in rejected if r["reason"] == Reason.DUPLICATE]
    conflicts = [r for r in rejected if r["reason"] == Reason.IDEMPOTENCY_CONFLICT]
    others = [r for r in rejected if r not in duplicates and r not in conflicts]
    event = counted_event(record)
    if event is None:
        if not rejected:
            answer["fate"] = "never_seen"
            answer["summary"] = (
                "neither the record nor the dead letters know this key for this customer"
                " (not sent, sent for another customer, or still in flight)"
            )
            return answer
        answer["fate"] = "rejected"
        reasons = sorted({r["reason"] for r in rejected})
        answer["summary"] = f"not counted: {', '.join(reasons)}"
        answer["rejections"] = [_copy(r) for r in rejected]
        answer["rejections_total"] = rejected_total
        return answer
    if corrections:
        answer["corrections"] = [
            {k: v for k, v in c.items() if k != "properties_json"} for c in corrections
        ]
        last = corrections[-1]
        if last["action"] == "void":
            answer["event"] = _event_doc(event, record[0]["ingested_at_ms"])
            answer["fate"] = "voided"
            answer["summary"] = (
                f"voided by correction {last['correction_id']} ({last['author']}:"
                f" {last['reason']}); counted by no meter, a copy sent again is a duplicate"
            )
            answer["rejections_total"] = rejected_total
            return answer
        event = effective.amended(event, last["properties_json"])
    answer["event"] = _event_doc(event, record[0]["ingested_at_ms"])
    if ALL_METERS in event.refused_meters:
        answer["fate"] = "rejected"
        answer["summary"] = "set aside as unprocessable: in the record, counted by no meter"
        answer["rejections"] = [_copy(r) for r in rejected]
        answer["rejections_total"] = rejected_total
        return answer
    counted_by = [name for name in record[0]["meters"] if name not in event.refused_meters]
    answer["counted"] = _counted_lines(event, meters, counted_by, windows)
    answer["not_counted"] = _not_counted_lines(event, meters, counted_by, others)
    if not meters.for_event_name(event.event_name) and not counted_by:
        answer["not_counted"].append(
            {"meter": "", "reason": "no_meter", "detail": f"no meter reads {event.event_name!r}"}
        )
    if not counted_by:
        answer["fate"] = "uncounted"
        answer["summary"] = "in the record, but no meter counts it"
    elif conflicts:
        answer["fate"] = "conflicting"
        answer["summary"] = (
            f"the first copy counts; {len(conflicts)} later copy(ies) with other content"
            " were refused"
        )
        answer["conflicting_copies"] = [_copy(r) for r in conflicts]
    elif duplicates:
        answer["fate"] = "duplicate"
        answer["summary"] = f"counted once; {len(duplicates)} exact resend(s) were not counted"
    else:
        answer["fate"] = "counted"
        answer["summary"] = f"counted by {', '.join(counted_by)}"
    if corrections:
        answer["summary"] += f"; amended by correction {corrections[-1]['correction_id']}"
    if duplicates:
        answer["duplicates"] = [iso(r["received_at_ms"]) for r in duplicates]
    if others:
        answer["rejections"] = [_copy(r) for r in others]
    answer["rejections_total"] = rejected_total
    return answer


def read_fate(
    ch: ClickHouse, customer_id: str, idempotency_key: str, meters: MetersConfig
) -> dict[str, Any]:
    """Read the key's rows and windows from ClickHouse and say its :func:`fate`."""
    record = lookup.record_rows(ch, customer_id, idempotency_key)
    rejected, total = lookup.rejected_rows(ch, customer_id, idempotency_key)
    event = counted_event(record)
    windows: dict[WindowRef, tuple[Decimal, int]] = {}
    if event is not None:
        refs = windows_of(event, meters, record[0]["meters"])
        windows = lookup.window_values(ch, customer_id, refs)
    fixes = key_corrections(ch, customer_id, idempotency_key) if event is not None else []
    return fate(customer_id, idempotency_key, record, rejected, total, meters, windows, fixes)
